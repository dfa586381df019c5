"""PNG figures of an `Analysis` (matplotlib, Agg backend: no display needed).

matplotlib is imported inside `_plt()` so importing the analysis module stays cheap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vllm_moeplace.profiling.analyze import Analysis


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    _plt().close(fig)
    return name


def plot_skew(a: Analysis, out: Path) -> str:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    x = a.layer_ids
    ax1.plot(x, a.max_over_mean, "o-", label="expert max/mean")
    for r, imb in a.rank_imbalance.items():
        ax1.plot(x, imb, ".--", label=f"EP{r} rank max/mean (linear)")
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.set_xlabel("decoder layer")
    ax1.set_ylabel("max / mean load")
    ax1.legend(fontsize=7)
    ax2.plot(x, a.gini, "o-", color="C3")
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("decoder layer")
    ax2.set_ylabel("Gini of expert load")
    return _save(fig, out, "load_skew.png")


def plot_load_heatmap(a: Analysis, out: Path) -> str:
    plt = _plt()
    share = a.load / np.maximum(a.load.mean(axis=1, keepdims=True), 1e-12)  # load / layer mean
    fig, ax = plt.subplots(figsize=(10, 3.8))
    im = ax.imshow(share, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_yticks(range(len(a.layer_ids))[:: max(1, len(a.layer_ids) // 12)])
    ax.set_yticklabels(a.layer_ids[:: max(1, len(a.layer_ids) // 12)])
    ax.set_xlabel("expert id")
    ax.set_ylabel("decoder layer")
    fig.colorbar(im, ax=ax, label="load / layer mean")
    return _save(fig, out, "load_heatmap.png")


def plot_lift(a: Analysis, out: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(a.layer_ids, a.top_pair_lift, "o-")
    ax.axhline(1.0, color="grey", lw=0.8, label="independence")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("mean lift of the 10 most\nfrequent pairs")
    ax.legend(fontsize=7)
    return _save(fig, out, "coactivation_lift.png")


def plot_transitions(a: Analysis, out: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = a.layer_ids[:-1]
    ax.plot(x, a.transition_share, "o-", label="observed (mean over experts)")
    ax.plot(x, a.transition_share_weighted, "s-", label="observed (mass-weighted)")
    ax.plot(x, a.transition_share_independent, ".--", color="C0", label="shuffled next layer (mean)")
    ax.plot(x, a.transition_share_weighted_independent, ".--", color="C1", label="shuffled next layer (weighted)")
    ax.set_ylim(0, 1)
    ax.set_xlabel("decoder layer (source)")
    ax.set_ylabel("share of next-layer mass\nin the top 20% experts")
    ax.legend(fontsize=7)
    return _save(fig, out, "transitions.png")


def plot_prefill_decode(a: Analysis, out: Path) -> str:
    plt = _plt()
    assert a.prefill_decode_spearman is not None
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(a.layer_ids, a.prefill_decode_spearman, "o-")
    ax.set_ylim(-1, 1)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("Spearman: prefill vs\ndecode expert load")
    return _save(fig, out, "prefill_decode.png")


def plot_stability(a: Analysis, out: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(a.layer_ids, a.stability_corr, "o-", label="Pearson r of load")
    ax.plot(a.layer_ids, a.stability_l1, "s--", label="L1 distance of load shares (0..2)")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("first vs second half\nof requests")
    ax.legend(fontsize=7)
    return _save(fig, out, "stability.png")


def plot_label_jaccard(a: Analysis, out: Path) -> str:
    plt = _plt()
    assert a.label_jaccard is not None
    n = len(a.labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * n, 1.0 + 0.45 * n))
    im = ax.imshow(a.label_jaccard, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(n))
    ax.set_xticklabels(a.labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n))
    ax.set_yticklabels(a.labels, fontsize=7)
    fig.colorbar(im, ax=ax, label=f"Jaccard of top-{a.hot_k} sets")
    return _save(fig, out, "label_jaccard.png")
