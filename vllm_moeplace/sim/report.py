"""Rows of simulated results -> markdown tables and PNG plots (matplotlib, Agg backend).

A `Row` is one (trace, topology, batch, hardware, layout) result. Tables put every layout of one scenario
side by side, with its ratio to vLLM's default `linear` layout.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

BASELINE = "linear"


@dataclass(frozen=True)
class Row:
    trace: str
    model: str
    ep_size: int
    num_nodes: int
    batch: str
    tokens_per_rank: int
    layout: str
    total_ms: float
    dispatch_ms: float
    compute_ms: float
    combine_ms: float
    rdma_gb: float  # dispatch + combine bytes over RDMA per step, all ranks
    nvlink_gb: float
    pair_imbalance: float  # sampled max/mean rank load, mean over layers
    node_sends: float  # placement metrics on the held-out trace (uniform origins)
    imbalance: float
    fit_seconds: float
    hardware: str = ""

    @property
    def scenario(self) -> tuple:
        return (self.trace, self.ep_size, self.num_nodes, self.batch, self.hardware)

    def as_dict(self) -> dict:
        return asdict(self)


def _by_scenario(rows: Iterable[Row]) -> dict[tuple, list[Row]]:
    out: dict[tuple, list[Row]] = {}
    for r in rows:
        out.setdefault(r.scenario, []).append(r)
    return out


def ratio(rows: list[Row], layout: str, field: str) -> float | None:
    """field(layout) / field(linear) within one scenario, or None if either is missing."""
    by = {r.layout: r for r in rows}
    if layout not in by or BASELINE not in by or getattr(by[BASELINE], field) == 0:
        return None
    return getattr(by[layout], field) / getattr(by[BASELINE], field)


def scenario_table(rows: list[Row]) -> str:
    """One markdown table: every layout of a scenario side by side."""
    head = (
        "| layout | MoE step (ms) | vs linear | dispatch | MoE compute | combine | RDMA GB/step | vs linear "
        "| NVLink GB/step | sampled max/mean load | node_sends | imbalance | fit (s) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        t = ratio(rows, r.layout, "total_ms")
        v = ratio(rows, r.layout, "rdma_gb")
        lines.append(
            f"| {r.layout} | {r.total_ms:.2f} | {_pct(t)} | {r.dispatch_ms:.2f} | {r.compute_ms:.2f} | {r.combine_ms:.2f} "
            f"| {r.rdma_gb:.2f} | {_pct(v)} | {r.nvlink_gb:.2f} | {r.pair_imbalance:.3f} | {r.node_sends:.3f} "
            f"| {r.imbalance:.3f} | {r.fit_seconds:.1f} |"
        )
    return head + "\n".join(lines) + "\n"


def _pct(x: float | None) -> str:
    if x is None:
        return "–"
    return "±0.0%" if abs(x - 1) < 5e-4 else f"{(x - 1) * 100:+.1f}%"


def all_tables(rows: list[Row]) -> str:
    parts = []
    for (trace, ep, nodes, batch, hw), rs in _by_scenario(rows).items():
        r0 = rs[0]
        parts.append(
            f"#### {r0.model} ({trace}), EP{ep} over {nodes} node(s) ({ep // nodes} GPUs/node), "
            f"{batch} batch: {r0.tokens_per_rank} tokens/rank, hardware `{hw}`\n\n" + scenario_table(rs)
        )
    return "\n".join(parts)


def summary_table(rows: list[Row]) -> str:
    """One line per scenario: linear's step time, then every layout's change against it."""
    layouts = list(dict.fromkeys(r.layout for r in rows))
    head = "| model | EP / nodes | batch (tokens/rank) | hardware | linear (ms) | " + " | ".join(layouts) + " |\n"
    head += "|---|---|---|---|---:|" + "---:|" * len(layouts) + "\n"
    lines = []
    for (trace, ep, nodes, batch, hw), rs in _by_scenario(rows).items():
        by = {r.layout: r for r in rs}
        lin = by.get(BASELINE)
        cells = [_pct(ratio(rs, name, "total_ms")) if name in by else "–" for name in layouts]
        lines.append(
            f"| {rs[0].model} | EP{ep} / {nodes} | {batch} ({rs[0].tokens_per_rank}) | {hw} | "
            f"{lin.total_ms:.2f} | " if lin else f"| {rs[0].model} | EP{ep} / {nodes} | {batch} | {hw} | – | "
        )
        lines[-1] += " | ".join(cells) + " |"
    return head + "\n".join(lines) + "\n"


def plot_time_vs_ep(rows: list[Row], path: Path, trace: str, title: str, hardware: str) -> None:
    """Step time vs EP size, one panel per batch kind, one line per layout and GPUs-per-node."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.trace == trace and r.hardware == hardware]
    batches = sorted({r.batch for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.2), squeeze=False)
    styles = {4: "-", 8: "--", 2: ":", 1: "-."}
    # One colour per layout, one line style per GPUs-per-node series.
    colours = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(r.layout for r in rows))}
    for ax, batch in zip(axes[0], batches):
        sel = [r for r in rows if r.batch == batch]
        for gpn in sorted({r.ep_size // r.num_nodes for r in sel}):
            for layout in colours:
                pts = sorted((r.ep_size, r.total_ms) for r in sel if r.layout == layout and r.ep_size // r.num_nodes == gpn)
                if len(pts) < 2:
                    continue
                xs, ys = zip(*pts)
                ax.plot(xs, ys, styles.get(gpn, "-"), color=colours[layout], marker="o", label=f"{layout} ({gpn} GPU/node)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("EP size (ranks); tokens per rank fixed, so the batch grows with EP")
        ax.set_ylabel("simulated MoE time per step (ms, all layers)")
        tpr = sel[0].tokens_per_rank if sel else 0
        ax.set_title(f"{batch}: {tpr} tokens/rank")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_breakdown(rows: list[Row], path: Path, title: str) -> None:
    """Stacked dispatch / compute / combine bars per layout, one panel per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _by_scenario(rows)
    n = len(groups)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 4), squeeze=False)
    for ax, ((trace, ep, nodes, batch, hw), rs) in zip(axes[0], groups.items()):
        names = [r.layout for r in rs]
        d = [r.dispatch_ms for r in rs]
        c = [r.compute_ms for r in rs]
        b = [r.combine_ms for r in rs]
        ax.bar(names, d, label="dispatch")
        ax.bar(names, c, bottom=d, label="MoE compute")
        ax.bar(names, b, bottom=[x + y for x, y in zip(d, c)], label="combine")
        ax.set_title(f"{rs[0].model}\nEP{ep}/{nodes} nodes, {batch}", fontsize=8)
        ax.tick_params(axis="x", rotation=60, labelsize=7)
        ax.set_ylabel("ms per step")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
