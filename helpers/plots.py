"""Pictures shared by the chapters. Every figure is drawn from data a real run returned."""
from __future__ import annotations

import matplotlib

import matplotlib.pyplot as plt
from matplotlib.patches import Patch

# One colour per kind of work, the same in every chapter.
COLORS = {"F": "#4C72B0", "B": "#DD8452", "W": "#55A868", "comm": "#C44E52", "idle": "#DDDDDD",
          "decode": "#8172B3", "prefill": "#937860"}


def gantt(events: list[dict], title: str = "", ax=None, label_key: str | None = "micro_batch",
          time_unit: str = "ms", ranks: list[int] | None = None):
    """A Gantt chart: one row per rank, one bar per event {rank, label, start, end[, micro_batch]}.

    Bars are coloured by `label` (F, B, W, comm, ...) and annotated with `event[label_key]` if present and the
    bar is wide enough to hold it. Text sizes follow matplotlib's font.size (a chapter may raise it).
    The legend sits to the right of the axes, outside the bars.
    """
    from helpers.timeline import normalize
    events = normalize(events)
    scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[time_unit]
    ranks = ranks if ranks is not None else sorted({e["rank"] for e in events})
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 0.6 + 0.45 * len(ranks)))
    bars: dict = {}            # one broken_barh per (rank, label): far fewer artists than one bar each
    span = (max((e["end"] for e in events), default=1) - min((e["start"] for e in events), default=0)) * scale
    for e in events:
        y = ranks.index(e["rank"])
        width = (e["end"] - e["start"]) * scale
        bars.setdefault((y, e["label"]), []).append((e["start"] * scale, width))
        # A label only where the bar can hold it: on a sliver it reads as a stray digit between two bars.
        if label_key and label_key in e and width >= 0.02 * span * max(1, len(str(e[label_key]))):
            ax.text(e["start"] * scale + width / 2, y, str(e[label_key]), ha="center", va="center",
                    fontsize="x-small", color="white")
    for (y, label), spans in bars.items():
        ax.broken_barh(spans, (y - 0.4, 0.8), facecolors=COLORS.get(label, "#999999"), edgecolor="white",
                       linewidth=0.5)
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.set_ylim(len(ranks) - 0.5, -0.5)
    ax.set_xlabel(f"time ({time_unit})")
    order = list(COLORS)       # F, B, W, comm, ...: the order of the work, then any other label
    labels = sorted({e["label"] for e in events}, key=lambda l: (order.index(l) if l in order else len(order), l))
    ax.legend(handles=[Patch(color=COLORS.get(l, "#999999"), label=l) for l in labels],
              loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize="small", frameon=False, borderaxespad=0)
    if title:
        ax.set_title(title, fontsize="medium")
    return ax


def process_group_picture(world_size: int, backend: str = "gloo", ax=None):
    """The ranks of one job: a process each, every one connected to the rendezvous store (dashed), and the
    process group (every rank can reach every other) that collectives run over."""
    import math
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
    angle = {r: math.pi / 2 - 2 * math.pi * r / world_size for r in range(world_size)}
    pos = {r: (math.cos(a), math.sin(a)) for r, a in angle.items()}
    for a in range(world_size):
        for b in range(a + 1, world_size):
            ax.plot(*zip(pos[a], pos[b]), color="#BBBBBB", lw=1, zorder=1)
    for r, (x, y) in pos.items():
        ax.add_patch(plt.Circle((x, y), 0.22, color=COLORS["F"], zorder=2))
        ax.text(x, y, f"rank {r}", ha="center", va="center", color="white", fontsize=9, zorder=3)
    for r, (x, y) in pos.items():
        ax.annotate("", xy=(0.25 * x, 0.25 * y), xytext=(0.78 * x, 0.78 * y),
                    arrowprops=dict(arrowstyle="->", color="#555555", linestyle="--"))
    ax.text(0, 0, "TCPStore\n(rendezvous)", ha="center", va="center", fontsize=8,
            bbox=dict(boxstyle="round", facecolor="white", edgecolor="#555555"), zorder=3)
    ax.set_title(f"world_size={world_size}, backend={backend}\n{world_size} processes, one process group")
    ax.set_xlim(-1.4, 1.4)
    ax.set_ylim(-1.4, 1.4)
    ax.set_aspect("equal")
    ax.axis("off")
    return ax
