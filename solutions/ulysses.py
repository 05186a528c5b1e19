"""Chapter 10: Ulysses sequence parallelism (DeepSpeed-Ulysses), beside chapter 8's ring attention.

Exercise 10.4  A long prompt is split along the sequence over the P ranks of a group (rank r holds the
               contiguous rows r·S/P .. (r+1)·S/P-1 of q, k, v). Attention needs every key for every query, so
               Ulysses re-shards before attention: one all-to-all turns "my rows, all heads" [S/P, H, D] into
               "all rows, my heads" [S, H/P, D]; each rank attends over the FULL sequence for its own heads (any
               attention kernel, unchanged); a second all-to-all turns the output back into "my rows, all
               heads". Three functions:

    sequence_to_heads(x, group)      [S/P, H, D] -> [S, H/P, D]   the all-to-all before attention
    heads_to_sequence(x, group)      [S, H/P, D] -> [S/P, H, D]   the all-to-all after it (the way back)
    ulysses_attention(q, k, v, ...)  both, with causal attention in between; grouped-query attention (GQA)

This is DeepSpeed's `DistributedAttention` (deepspeed/sequence/layer.py: `single_all_to_all(input, scatter_idx,
gather_idx, group)` scatters the head dimension and gathers the sequence with one `dist.all_to_all_single`,
and the way back swaps the two indices). The layout formulas, the bytes each rank sends, the head-count limit
and the hybrid Ulysses × ring scheme that lifts it are in helpers/course/ulysses.py.

Shapes: [seq, heads, head_dim] (sequence first, as DeepSpeed's [s, b, h, d] without the batch).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

# ---------------------------------------------------------------------------------- 10.4 Ulysses


def sequence_to_heads(x: torch.Tensor, group=None) -> torch.Tensor:
    """The all-to-all before attention: from this rank's rows of every head to every row of this rank's heads.

    x: [S/P, H, D], this rank's contiguous rows (rank r of the P ranks of `group` holds rows r·S/P ..
    (r+1)·S/P-1). Returns [S, H/P, D]: heads r·H/P .. (r+1)·H/P-1 of the whole sequence, rows in sequence
    order (rank 0's rows first). One all-to-all in `group` (dist.all_to_all_single or dist.all_to_all):
    rank r sends its rows of head block j to rank j and receives rank j's rows of head block r; each rank
    sends (P-1)/P of x and keeps the rest. No other communication.
    Raises ValueError when H is not divisible by P (before any communication)."""
    if x.dim() != 3:
        raise ValueError(f"x must be [seq/P, heads, head_dim], got shape {tuple(x.shape)}")
    p = dist.get_world_size(group)
    rows, heads, head_dim = x.shape
    if heads % p:
        raise ValueError(f"heads={heads} is not divisible by the group size {p}: each rank takes heads/P heads")
    # [S/P, P, H/P, D] -> [P, S/P, H/P, D]: block j (heads of rank j) first, so all_to_all_single sends block j to j
    blocks = x.reshape(rows, p, heads // p, head_dim).transpose(0, 1).contiguous()
    received = torch.empty_like(blocks)                  # block j: rank j's rows of my heads
    dist.all_to_all_single(received, blocks, group=group)
    return received.reshape(p * rows, heads // p, head_dim)


def heads_to_sequence(x: torch.Tensor, group=None) -> torch.Tensor:
    """The all-to-all after attention (the way back): the inverse of sequence_to_heads.

    x: [S, H/P, D], every row of this rank's heads (rank r: heads r·H/P .. (r+1)·H/P-1). Returns [S/P, H, D]:
    this rank's contiguous rows, all H heads in order. One all-to-all in `group`.
    Raises ValueError when S is not divisible by P."""
    if x.dim() != 3:
        raise ValueError(f"x must be [seq, heads/P, head_dim], got shape {tuple(x.shape)}")
    p = dist.get_world_size(group)
    seq, local_heads, head_dim = x.shape
    if seq % p:
        raise ValueError(f"seq={seq} is not divisible by the group size {p}: each rank holds seq/P rows")
    blocks = x.reshape(p, seq // p, local_heads, head_dim).contiguous()   # block j: rank j's rows
    received = torch.empty_like(blocks)                  # block j: my rows of rank j's heads
    dist.all_to_all_single(received, blocks, group=group)
    return received.transpose(0, 1).reshape(seq // p, p * local_heads, head_dim)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None,
                      causal: bool = True) -> torch.Tensor:
    """Attention over the whole sequence, the sequence split over the ranks of `group`, by two all-to-alls.

    q: [S/P, H, D]; k, v: [S/P, H_kv, D] (grouped-query attention: query head h reads KV head h // (H/H_kv),
    as Llama and transformers' repeat_kv), this rank's contiguous rows. Returns [S/P, H, D]: softmax(q kᵀ/√D,
    causal mask by position) v for this rank's rows, equal to attention on the whole sequence.

    The mechanism: sequence_to_heads of q, k and v (rank r gets query heads r·H/P.. and KV heads r·H_kv/P..,
    exactly the KV heads its query heads read: the contiguous split keeps each GQA group with its KV head);
    attention on the full sequence for the local heads; heads_to_sequence of the output. K and V travel as
    they are, H_kv heads, never repeated to H before the exchange (that would send H/H_kv times the bytes).
    Each rank sends (P-1)/P · (S/P)·(H + 2·H_kv + H)·D elements: q, k, v out and the output back.

    Raises ValueError (before any communication) when P > H_kv — the Ulysses degree cannot exceed the number
    of KV heads, since a rank would hold less than one KV head (lift it with the hybrid Ulysses × ring scheme,
    helpers/course/ulysses.py) — or when H_kv is not divisible by P, H not by H_kv, or the shapes disagree."""
    p = dist.get_world_size(group)
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q must be [seq/P, heads, head_dim] and k, v [seq/P, kv_heads, head_dim] with the same "
                         f"rows and head_dim, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}")
    if p > kv_heads:
        raise ValueError(f"Ulysses degree P={p} > kv_heads={kv_heads}: each rank needs at least one whole KV "
                         f"head; use P <= {kv_heads} KV heads, or a hybrid Ulysses x ring layout for the rest")
    if kv_heads % p:
        raise ValueError(f"kv_heads={kv_heads} is not divisible by the Ulysses degree P={p}")
    q_h, k_h, v_h = (sequence_to_heads(t, group) for t in (q, k, v))           # [S, H/P or H_kv/P, D]
    acc = torch.promote_types(q.dtype, torch.float32)
    out = F.scaled_dot_product_attention(q_h.transpose(0, 1).to(acc), k_h.transpose(0, 1).to(acc),
                                         v_h.transpose(0, 1).to(acc), is_causal=causal,
                                         enable_gqa=True)                      # [H/P, S, D]
    return heads_to_sequence(out.transpose(0, 1).to(q.dtype), group)
