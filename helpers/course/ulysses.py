"""Ulysses sequence parallelism, given code for chapter 10 (exercise 10.4 is labs/ulysses.py): the layouts, the
bytes each rank sends (beside ring attention's), the head-count limit and the hybrid Ulysses × ring scheme.

Two ways to attend over a sequence split over P ranks (each holds S/P contiguous rows of q, k, v):

    ring attention (chapter 8)   K/V blocks travel round a ring, P-1 point-to-point steps; every rank keeps its
                                 queries. Per rank: (P-1) · 2·(S/P)·H_kv·D values sent — about 2·S·H_kv·D,
                                 whatever P.
    Ulysses (DeepSpeed)          one all-to-all re-shards [S/P, H, D] (my rows, all heads) into [S, H/P, D] (all
                                 rows, my heads); attention is local; one all-to-all brings the output back.
                                 Per rank: (P-1)/P · (S/P)·(2H + 2H_kv)·D values — it SHRINKS as P grows.

Ulysses splits heads, so P cannot exceed the KV heads (a rank must hold whole KV heads: `max_ulysses_degree`).
The hybrid scheme (USP, Fang & Zhao 2024, "A Unified Sequence Parallelism Approach"; Megatron-LM's hierarchical
context parallelism, `cp_comm_type="a2a+p2p"`) lifts it: P = U × R ranks; Ulysses inside groups of U
consecutive ranks (U ≤ H_kv), ring attention across the R groups. With the ring's "contiguous" layout the
hybrid keeps the plain contiguous layout: global rank g = i·U + u still holds rows g·S/P .. (g+1)·S/P-1.

Sources read: DeepSpeed's deepspeed/sequence/layer.py (`single_all_to_all`, `DistributedAttention`: scatter the
head index, gather the sequence, swap them on the way back); the course's helpers/course/ring_attention.py and
solutions/context_parallel.py (the ring, its layouts).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from helpers.impl import load_impl

__all__ = ["rows_of_rank", "shard_rows", "heads_of_rank", "max_ulysses_degree", "ulysses_bytes_per_rank",
           "ring_bytes_per_rank", "hybrid_groups", "hybrid_attention", "plot_layouts"]


def rows_of_rank(seq: int, rank: int, p: int) -> slice:
    """The contiguous rows rank `rank` of `p` holds: rank·S/P .. (rank+1)·S/P-1."""
    if seq % p:
        raise ValueError(f"seq={seq} is not divisible by P={p}: pad the prompt to a multiple of {p}")
    n = seq // p
    return slice(rank * n, (rank + 1) * n)


def shard_rows(x: torch.Tensor, rank: int, p: int) -> torch.Tensor:
    """Rank `rank`'s rows of x [S, ...] (a contiguous copy)."""
    return x[rows_of_rank(x.shape[0], rank, p)].contiguous()


def heads_of_rank(heads: int, rank: int, p: int) -> slice:
    """The heads rank `rank` attends for after the first all-to-all: rank·H/P .. (rank+1)·H/P-1."""
    if heads % p:
        raise ValueError(f"heads={heads} is not divisible by P={p}")
    n = heads // p
    return slice(rank * n, (rank + 1) * n)


def max_ulysses_degree(kv_heads: int) -> int:
    """The largest Ulysses degree: one whole KV head per rank (a GQA group never straddles two ranks)."""
    return kv_heads


def ulysses_bytes_per_rank(seq: int, heads: int, kv_heads: int, head_dim: int, p: int,
                           bytes_per_value: int = 4) -> dict:
    """Bytes one rank sends (what leaves it: (P-1)/P of each all-to-all's input) and the all-to-all payloads
    (the input tensors, CommTracer's `payload`). to_heads: q, k, v; back: the output."""
    rows = seq // p
    to_heads = rows * (heads + 2 * kv_heads) * head_dim * bytes_per_value
    back = rows * heads * head_dim * bytes_per_value
    return {"payload": to_heads + back, "sent": (to_heads + back) * (p - 1) // p,
            "sent_to_heads": to_heads * (p - 1) // p, "sent_back": back * (p - 1) // p}


def ring_bytes_per_rank(seq: int, kv_heads: int, head_dim: int, cp: int, bytes_per_value: int = 4) -> int:
    """Bytes one rank sends in ring attention: cp-1 K/V blocks of 2 · (S/cp) · H_kv · D values (chapter 8)."""
    return (cp - 1) * 2 * (seq // cp) * kv_heads * head_dim * bytes_per_value


def hybrid_groups(world_size: int, ulysses: int):
    """(ulysses_group, ring_group) of this rank: Ulysses over U consecutive ranks, the ring over ranks u, u+U, ...
    Every rank must call it (dist.new_group is collective); returns the groups this rank belongs to."""
    if world_size % ulysses:
        raise ValueError(f"world_size={world_size} is not divisible by the Ulysses degree {ulysses}")
    rank, rings = dist.get_rank(), world_size // ulysses
    mine = [None, None]
    for i in range(rings):
        g = dist.new_group(list(range(i * ulysses, (i + 1) * ulysses)))
        if rank // ulysses == i:
            mine[0] = g
    for u in range(ulysses):
        g = dist.new_group(list(range(u, world_size, ulysses)))
        if rank % ulysses == u:
            mine[1] = g
    return tuple(mine)


def hybrid_attention(q, k, v, ulysses_group, ring_group, causal: bool = True) -> torch.Tensor:
    """Ulysses inside `ulysses_group`, ring attention across `ring_group`: P = U × R ranks, U ≤ KV heads, R free.

    q: [S/P, H, D], k, v: [S/P, H_kv, D], this rank's contiguous rows (global rank g = i·U + u). Ulysses'
    all-to-all gives rows of ring block i (S/R rows) for this rank's H/U heads; the ring (chapter 8's
    ring_attention, "contiguous" layout, its K/V blocks [H/U, S/R, D]) attends them over the whole sequence;
    the output goes back by the second all-to-all. The ring needs K/V with the queries' heads, so the H_kv/U
    local KV heads are repeated to H/U AFTER the exchange (the all-to-all still moves H_kv heads; the ring
    then moves the repeated ones — a price of this simple version). Returns [S/P, H, D]."""
    ulysses = load_impl("ulysses")
    ring = load_impl("context_parallel").ring_attention
    u = dist.get_world_size(ulysses_group)
    if u > k.shape[1]:
        raise ValueError(f"Ulysses degree {u} > kv_heads={k.shape[1]}: make the Ulysses groups smaller")
    q_h, k_h, v_h = (ulysses.sequence_to_heads(t, ulysses_group) for t in (q, k, v))   # [S/R, heads/U, D]
    group = q_h.shape[1] // k_h.shape[1]
    k_h, v_h = k_h.repeat_interleave(group, dim=1), v_h.repeat_interleave(group, dim=1)
    out = ring(*(t.transpose(0, 1).contiguous() for t in (q_h, k_h, v_h)), group=ring_group, causal=causal,
               order="contiguous")                                                     # [H/U, S/R, D]
    return ulysses.heads_to_sequence(out.transpose(0, 1).contiguous(), ulysses_group)


def plot_layouts(seq: int, heads: int, p: int, axes=None):
    """Who holds which (row, head) cell before the first all-to-all (rows split) and between the two (heads
    split): two grids coloured by rank."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    owner_rows = torch.arange(seq)[:, None].div(seq // p, rounding_mode="floor").expand(seq, heads)
    owner_heads = torch.arange(heads)[None, :].div(heads // p, rounding_mode="floor").expand(seq, heads)
    cmap = ListedColormap(["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3",
                           "#8C8C8C"][:p])
    for ax, owner, title in [(axes[0], owner_rows, f"sequence-sharded [S/P, H, D]\n(before / after attention)"),
                             (axes[1], owner_heads, f"head-sharded [S, H/P, D]\n(between the two all-to-alls)")]:
        ax.imshow(owner.T.numpy(), cmap=cmap, vmin=-0.5, vmax=p - 0.5, aspect="auto", interpolation="nearest")
        ax.set_xlabel("sequence position")
        ax.set_ylabel("head")
        ax.set_title(title, fontsize="medium")
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(r)) for r in range(p)]
    axes[1].legend(handles, [f"rank {r}" for r in range(p)], loc="upper left", bbox_to_anchor=(1.02, 1.0),
                   frameon=False, fontsize="small")
    return axes
