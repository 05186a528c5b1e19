"""Pictures of collectives, drawn from the tensors a real run returned (chapter 1, reused later).

    draw_collective("all_gather", before, after)   # before/after: one entry per rank
    plot_sweep(rows, ceiling)                      # latency and busbw against message size
    plot_cost_model(n, alpha, beta)                # alpha-beta predictions, ring vs recursive doubling

Cells are coloured by where their value came from: each value of the *before* tensors belongs to the rank
that held it; an *after* value found on exactly one rank before gets that rank's colour, a value that no
single rank held (a sum, an average) is drawn dark: it was combined from several ranks.
"""
from __future__ import annotations


import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Patch, Rectangle

RANK_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]
COMBINED = "#333333"
EMPTY = "#F2F2F2"


def _pieces(entry):
    """A rank's entry -> list of 1-D tensors (a list of tensors, e.g. scatter's input, stays split)."""
    if entry is None:
        return []
    if isinstance(entry, torch.Tensor):
        return [entry.detach().flatten()]
    return [t.detach().flatten() for t in entry]


def _label(v: float) -> str:
    return f"{v:g}" if abs(v) < 1e4 else f"{v:.1e}"


def _origins(before):
    """value -> set of ranks that held it before the collective."""
    held: dict = {}
    for rank, entry in enumerate(before):
        for piece in _pieces(entry):
            for v in piece.tolist():
                held.setdefault(v, set()).add(rank)
    return held


def _draw_side(ax, entries, colour_of, title):
    width = max([sum(p.numel() for p in _pieces(e)) for e in entries] + [1])
    for rank, entry in enumerate(entries):
        y = rank
        x = 0
        pieces = _pieces(entry)
        if not pieces:
            ax.add_patch(Rectangle((0, y - 0.4), width, 0.8, facecolor=EMPTY, edgecolor="#BBBBBB", lw=0.5))
            ax.text(width / 2, y, "(nothing)", ha="center", va="center", fontsize=9, color="#888888")
        for piece in pieces:
            for v in piece.tolist():
                colour = colour_of(rank, v)
                ax.add_patch(Rectangle((x, y - 0.4), 1, 0.8, facecolor=colour, edgecolor="white", lw=1))
                ax.text(x + 0.5, y, _label(v), ha="center", va="center", fontsize=10, color="white")
                x += 1
            if piece is not pieces[-1]:
                ax.plot([x, x], [y - 0.45, y + 0.45], color="black", lw=1.5)
    ax.set_xlim(-0.1, width + 0.1)
    ax.set_ylim(len(entries) - 0.5, -0.5)
    ax.set_yticks(range(len(entries)), [f"rank {r}" for r in range(len(entries))], fontsize=10)
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title, fontsize=10)


def draw_collective(name: str, before: list, after: list, figsize=None):
    """Two panels, before and after, one row per rank, one cell per element; the legend on the right.

    before/after: one entry per rank: a tensor, a list of tensors (drawn side by side, split by a bar), or
    None (the rank holds nothing that matters, e.g. a receive buffer). Returns the figure.
    """
    held = _origins(before)
    n = max(len(before), len(after))

    def colour_before(rank, v):
        return RANK_COLORS[rank % len(RANK_COLORS)]

    def colour_after(rank, v):
        owners = held.get(v, set())
        return RANK_COLORS[next(iter(owners)) % len(RANK_COLORS)] if len(owners) == 1 else COMBINED

    widths = [max([sum(p.numel() for p in _pieces(e)) for e in side] + [1]) for side in (before, after)]
    if figsize is None:   # sized for a notebook column: ~0.55 inch per cell, 0.5 inch per rank
        figsize = (min(8.0, max(6.0, 1.6 + 0.55 * sum(widths))), 0.9 + 0.5 * n)
    fig, axes = plt.subplots(1, 2, figsize=figsize, gridspec_kw={"width_ratios": widths})
    _draw_side(axes[0], before, colour_before, "before")
    _draw_side(axes[1], after, colour_after, "after")
    axes[1].set_yticks([])
    handles = [Patch(color=RANK_COLORS[r % len(RANK_COLORS)], label=f"from rank {r}") for r in range(n)]
    if any(colour_after(r, v) == COMBINED for r, e in enumerate(after) for p in _pieces(e) for v in p.tolist()):
        handles.append(Patch(color=COMBINED, label="combined"))
    fig.suptitle(name, fontsize=11, family="monospace")
    fig.tight_layout()
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=10, frameon=False)
    return fig


def plot_sweep(rows: list[dict], ceiling: float | None = None, title: str = ""):
    """Latency (left) and bus bandwidth (right) against message size; one line per (op, ranks).

    rows: dicts with op, ranks, bytes, seconds, busbw (bytes/s), as helpers.benchmarks.collectives.sweep
    returns. ceiling: bytes/s drawn as a horizontal line (e.g. single-process memcpy bandwidth).
    The legend sits below the two panels, outside the data."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    series: dict = {}
    for r in rows:
        series.setdefault((r["op"], r["ranks"]), []).append(r)
    ops = sorted({op for op, _ in series})
    most = max(ranks for _, ranks in series)
    for (op, ranks), points in sorted(series.items()):
        points = sorted(points, key=lambda p: p["bytes"])
        sizes = [p["bytes"] for p in points]
        style = dict(ls="-" if ranks == most else "--", marker="o", ms=4, color=f"C{ops.index(op)}",
                     label=f"{op}, {ranks} ranks")
        left.loglog(sizes, [p["seconds"] * 1e3 for p in points], **style)
        right.loglog(sizes, [p["busbw"] / 1e9 for p in points], **style)
    if ceiling:
        right.axhline(ceiling / 1e9, color="black", lw=1, ls=":")
        right.text(min(r["bytes"] for r in rows), ceiling / 1e9, " memcpy, one core", va="top", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("message size S (bytes)")
        ax.grid(True, which="major", alpha=0.3)
    left.set_ylabel("time per call (ms)")
    right.set_ylabel("bus bandwidth (GB/s)")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncols=min(3, len(labels)),
               fontsize=9, frameon=False)
    return fig


def doubling_steps(n: int) -> int:
    """Messages of S on recursive doubling's critical path (lab 1.4): log2 p exchanges among the largest
    power of two p <= n, plus, when n is not a power of two, the fold into rank r - p and the result sent back."""
    if n <= 1:
        return 0
    p = 1 << (n.bit_length() - 1)
    return p.bit_length() - 1 + (2 if n != p else 0)


def cost_model(n: int, nbytes: float, alpha: float, beta: float) -> dict:
    """alpha-beta time of an all-reduce of nbytes on n ranks: alpha = seconds per message,
    beta = seconds per byte. Ring: 2(n-1) messages of S/n. Recursive doubling: doubling_steps(n) messages of S."""
    steps = doubling_steps(n)
    return {"ring": 2 * (n - 1) * alpha + 2 * (n - 1) / n * nbytes * beta,
            "recursive doubling": steps * alpha + steps * nbytes * beta}


def plot_cost_model(n: int = 4, alpha_us: float = 50.0, bandwidth_gbs: float = 1.0, ax=None):
    """Predicted all-reduce time against size for a ring and for recursive doubling, and where they cross."""
    alpha, beta = alpha_us * 1e-6, 1 / (bandwidth_gbs * 1e9)
    sizes = [2 ** k for k in range(6, 28)]
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.5))
    for algo, style in (("ring", "-"), ("recursive doubling", "--")):
        ax.loglog(sizes, [cost_model(n, s, alpha, beta)[algo] * 1e3 for s in sizes], style, label=algo)
    # Crossover: 2(n-1)a + 2(n-1)/n S b = L a + L S b  ->  S = a (2(n-1) - L) / (b (L - 2(n-1)/n))
    steps = doubling_steps(n)
    denominator = beta * (steps - 2 * (n - 1) / n)
    if n > 2 and denominator > 0:
        cross = alpha * (2 * (n - 1) - steps) / denominator
        ax.axvline(cross, color="gray", lw=0.8, ls=":")
        ax.text(cross, ax.get_ylim()[1], f" crossover {cross / 1024:.0f} KiB", va="top", fontsize=9)
    ax.set_xlabel("message size S (bytes)")
    ax.set_ylabel("predicted time (ms)")
    ax.set_title(f"alpha-beta model, n={n}, alpha={alpha_us:g} us, bandwidth={bandwidth_gbs:g} GB/s", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    ax.grid(True, alpha=0.3)
    return ax
