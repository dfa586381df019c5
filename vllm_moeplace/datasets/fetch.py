"""Download a dataset's files into the user cache, check every checksum, convert to the native trace.

Each file is streamed into a temporary file beside its destination and renamed into place only
after its sha256 matched, so an interrupted or corrupted download never leaves a file under its
real name; files already in the cache with the right checksum are not downloaded again. The
converted trace is written atomically by `save_trace`.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from vllm_moeplace.datasets.registry import Dataset, cached_trace, dataset_dir, fetch_command
from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.profiling.importers import import_trace
from vllm_moeplace.trace import Trace, save_trace

TIMEOUT_S = 60
MAX_FILE_BYTES = 256 << 20  # the largest source file is well under 1 MiB; stop a runaway response early
WORKERS = 8  # ~1000 small files: sequential requests would be dominated by round trips


class DatasetError(MoeplaceError):
    """A download failed or did not match its checksum; the message names the URL."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str) -> None:
    """Fetch `url` to `dest` if and only if its content has checksum `sha256`."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    h, size = hashlib.sha256(), 0
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "vllm-moeplace datasets"})
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            while chunk := resp.read(1 << 16):
                size += len(chunk)
                if size > MAX_FILE_BYTES:
                    raise DatasetError(f"{url}: larger than {MAX_FILE_BYTES >> 20} MiB, not the expected file")
                h.update(chunk)
                f.write(chunk)
        if h.hexdigest() != sha256:
            raise DatasetError(
                f"{url}: checksum mismatch: expected sha256 {sha256}, got {h.hexdigest()} ({size} bytes); "
                "the file was not kept (the source changed or the transfer was corrupted)"
            )
        os.replace(tmp, dest)
    except OSError as e:  # URLError and HTTPError are OSErrors; so are disk errors
        raise DatasetError(
            f"{url}: download failed: {getattr(e, 'reason', None) or e} "
            "(no network here? `--source-url BASE` fetches the same files from a mirror or a local copy)"
        ) from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fetch(ds: Dataset, base_url: str | None = None, log: Callable[[str], None] = _stderr) -> tuple[Path, Trace]:
    """Download (or reuse) every file of `ds` from `base_url` (default: its pinned GitHub commit),
    then convert them; returns the path of the converted trace and the trace."""
    base = (base_url or ds.base_url).rstrip("/") + "/"
    raw = dataset_dir(ds) / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for stale in raw.glob(".*.part"):  # left by a killed earlier run
        stale.unlink(missing_ok=True)
    files = ds.files()
    todo = [(n, d) for n, d in files if not (raw / n).is_file() or sha256_file(raw / n) != d]
    log(f"{ds.name}: {len(files) - len(todo)} of {len(files)} files already in {raw}; downloading {len(todo)} from {base}")
    if todo:
        step = max(1, len(todo) // 10)
        with ThreadPoolExecutor(WORKERS) as pool:
            jobs = [pool.submit(download, base + urllib.parse.quote(n), raw / n, d) for n, d in todo]
            try:
                for i, job in enumerate(jobs, 1):
                    job.result()
                    if i % step == 0 or i == len(jobs):
                        log(f"{ds.name}: {i}/{len(jobs)} files checked and stored")
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
    trace = import_trace(ds.importer, [raw / n for n, _ in files], ds.options)
    if ds.finish is not None:
        trace = ds.finish(trace)
    # one folder instead of ~1000 file paths in the trace's meta
    trace.meta.update(dataset=ds.name, source=ds.source, fetch_command=fetch_command(ds), source_paths=[str(raw)])
    for note in trace.meta.get("import_notes", []):
        log(f"{ds.name}: note: {note}")
    out = cached_trace(ds)
    save_trace(out, trace)
    return out, trace
