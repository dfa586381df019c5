"""`moeplace datasets list|fetch NAME [--source-url BASE]`: the public traces the project uses,
downloaded with checksums into the user cache and converted to the native .npz (docs/datasets.md)."""

from __future__ import annotations

import argparse

from vllm_moeplace.datasets import DATASETS, cache_root, cached_trace, fetch, fetch_command, shared_data_root


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("list", help="the known datasets, their sources and where each is found here")
    f = sub.add_parser("fetch", help="download NAME's files (checksummed) into the cache and convert them")
    f.add_argument("name", choices=sorted(DATASETS), help="dataset name (see `moeplace datasets list`)")
    f.add_argument("--source-url", metavar="BASE",
                   help="fetch the files from BASE/<file name> instead of the pinned GitHub commit "
                        "(a mirror, or file:///path/to/a/copy); the checksums are the same")


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        print(f"cache: {cache_root()} (set MOEPLACE_CACHE to move it)")
        for ds in DATASETS.values():
            shared = shared_data_root() / ds.shared_trace if ds.shared_trace else None
            if shared is not None and shared.is_file():
                where = f"in the shared data: {shared}"
            elif cached_trace(ds).is_file():
                where = f"fetched: {cached_trace(ds)}"
            else:
                where = f"not fetched: {fetch_command(ds)}"
            print(f"\n{ds.name}\n  {ds.title}\n  source: {ds.source} ({len(ds.files())} files, ~{ds.size_mb} MB), "
                  f"converted with `moeplace import --format {ds.importer}`\n  {where}")
        return 0
    ds = DATASETS[args.name]
    path, t = fetch(ds, args.source_url)
    print(f"wrote {path}: {t.num_tokens} tokens ({int(t.is_prefill.sum())} prefill), {len(set(t.request_ids.tolist()))} requests, "
          f"{t.num_layers} MoE layers {t.layer_ids.min()}..{t.layer_ids.max()}, top_k {t.top_k}, {t.num_experts} experts")
    print(f"use it: moeplace analyze {path} --out DIR; moeplace solve --trace {path} --ep-size N ...")
    return 0
