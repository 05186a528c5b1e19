"""Chapter 8, part B: sequence parallelism and context parallelism (ring attention).

Exercise 8.3  The sequence-parallel region (Megatron-LM, "Reducing Activation Recomputation in Large
              Transformer Models"): outside the tensor-parallel matmuls (around the norms, the residual, the
              dropout) every rank keeps only its 1/n of the tokens. The TP all-reduce after a row-parallel
              layer becomes a reduce-scatter along the sequence, and the input of a column-parallel layer is
              all-gathered along the sequence. Three autograd operators, each with its conjugate backward:

    operator                                      forward                    backward
    scatter_to_sequence_parallel_region           keep my rows               all-gather
    gather_from_sequence_parallel_region          all-gather                 reduce-scatter
    reduce_scatter_to_sequence_parallel_region    reduce-scatter             all-gather

Exercise 8.4  `ring_attention`: causal attention over a prompt whose sequence is split over the ranks of a
              group. Each rank keeps its queries; the K/V blocks travel around the ring by point-to-point
              messages, and each rank folds every block into its running result with online-softmax
              rescaling. The layout (which rows a rank holds) is given in helpers/course/ring_attention.py.

Shapes: sequence-parallel tensors are [seq, ...] (sequence first, Megatron's [s, b, h]); attention tensors
are [heads, seq, head_dim].
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from helpers.course.ring_attention import ORDERS, chunks_of_rank

# ---------------------------------------------------------------------------- 8.3 sequence parallelism


def _rows_per_rank(x: torch.Tensor, world_size: int) -> int:
    if x.dim() == 0 or x.shape[0] % world_size:
        raise ValueError(f"sequence length {x.shape[0] if x.dim() else 'of a scalar'} is not divisible by the "
                         f"group size {world_size}: sequence parallelism gives every rank the same number of "
                         f"tokens; pad the sequence to a multiple of {world_size}")
    return x.shape[0] // world_size


def _my_rows(x, group):
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    rows = _rows_per_rank(x, world_size)
    return x[rank * rows:(rank + 1) * rows].clone()


def _all_gather_rows(x, group):
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return x.clone()
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def _reduce_scatter_rows(x, group):
    world_size = dist.get_world_size(group)
    rows = _rows_per_rank(x, world_size)
    if world_size == 1:
        return x.clone()
    out = torch.empty_like(x[:rows])
    dist.reduce_scatter(out, list(x.contiguous().split(rows)), group=group)
    return out


class _ScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _my_rows(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_rows(grad, ctx.group), None


class _GatherFromSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_rows(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_rows(grad, ctx.group), None


class _ReduceScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_rows(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_rows(grad, ctx.group), None


def scatter_to_sequence_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Enter the sequence-parallel region from a tensor every rank holds whole (e.g. the embeddings).

    x: [seq, ...], the same on every rank of `group`. Forward: this rank's contiguous rows
    [rank·seq/n, (rank+1)·seq/n) — no communication. Backward: all-gather the gradient along the sequence
    (each rank's rows influenced only its own slice of x).
    Raises ValueError when seq is not divisible by the group size."""
    _rows_per_rank(x, dist.get_world_size(group))
    return _ScatterToSequenceRegion.apply(x, group)


def gather_from_sequence_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Leave the sequence-parallel region before a column-parallel layer (after the norm).

    x: [seq/n, ...], this rank's rows. Forward: all-gather along the sequence -> [seq, ...], rows in rank
    order. Backward: REDUCE-SCATTER the gradient: every rank's column-parallel layer produced a partial
    dL/d(gathered x) for all seq rows, so the sum over ranks is the true gradient, and each rank keeps its rows.
    (The conjugate of reduce_scatter_to_sequence_parallel_region.)"""
    return _GatherFromSequenceRegion.apply(x, group)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Enter the sequence-parallel region after a row-parallel layer: where plain TP all-reduces.

    x: [seq, ...], this rank's PARTIAL sum for all seq rows. Forward: reduce-scatter -> [seq/n, ...], the
    summed rows this rank owns. Backward: all-gather the gradient along the sequence.
    Raises ValueError when seq is not divisible by the group size."""
    _rows_per_rank(x, dist.get_world_size(group))
    return _ReduceScatterToSequenceRegion.apply(x, group)


# ------------------------------------------------------------------------------- 8.4 ring attention


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, causal: bool = True,
                   order: str = "zigzag") -> torch.Tensor:
    """Attention of this rank's queries over the whole sequence, the sequence split over the ranks of `group`.

    q, k, v: [heads, seq/cp, head_dim], this rank's rows in the layout `order` of helpers/course/ring_attention.py
    (the 2·cp chunks of seq/(2·cp) tokens; "zigzag": rank i holds chunks i and 2cp-1-i; "contiguous": chunks
    2i and 2i+1), where cp is the group size. Returns [heads, seq/cp, head_dim]: softmax(q kᵀ/√d, causal
    mask by GLOBAL position) v for this rank's queries, equal to full attention's rows at these positions.

    The mechanism: cp steps. At each step the rank attends to the K/V block it holds, while that block is
    passed on to the next rank of the ring and the previous rank's block arrives (point-to-point: isend/irecv,
    batch_isend_irecv or send/recv; never a collective of the full K/V). Each rank sends cp-1 blocks (its own
    K and V, then the ones it received; the last block is not forwarded) and nothing else. Each block is
    folded in with online-softmax rescaling: keep per query row the running max m, the running sum l and the
    unnormalised output o; for a block with scores s, m' = max(m, rowmax s), l = l·e^(m-m') + Σ e^(s-m'),
    o = o·e^(m-m') + e^(s-m') v; at the end out = o / l. With causal=True, skip every (query chunk, key
    chunk) pair the mask hides entirely (key chunk after query chunk) and mask the diagonal pairs: the
    skipped work is what the zigzag order balances. Accumulate in at least float32; return q's dtype.

    Raises ValueError when q, k, v are not 3-D with equal shapes, when seq/cp is odd (each rank holds two
    chunks), or when order is not one of ORDERS."""
    if order not in ORDERS:
        raise ValueError(f"order={order!r}: use one of {ORDERS}")
    if q.dim() != 3 or q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v must be [heads, seq/cp, head_dim] with equal shapes, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    heads, local, head_dim = q.shape
    if local % 2:
        raise ValueError(f"this rank holds {local} rows: each rank holds two equal chunks, so seq/cp must be even")
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    chunk, scale = local // 2, 1 / math.sqrt(head_dim)
    acc = torch.promote_types(q.dtype, torch.float32)
    my_chunks = chunks_of_rank(rank, cp, order)
    m = torch.full((heads, local, 1), float("-inf"), dtype=acc)
    l = torch.zeros(heads, local, 1, dtype=acc)
    o = torch.zeros(heads, local, head_dim, dtype=acc)
    diagonal_mask = torch.ones(chunk, chunk, dtype=torch.bool).triu(1)
    to_rank = dist.get_global_rank(group, (rank + 1) % cp) if group is not None else (rank + 1) % cp
    from_rank = dist.get_global_rank(group, (rank - 1) % cp) if group is not None else (rank - 1) % cp

    kv = torch.stack([k, v])                       # one message per step: [2, heads, seq/cp, head_dim]
    for step in range(cp):
        owner = (rank - step) % cp                 # whose K/V this rank holds now
        requests, incoming = [], None
        if step < cp - 1:                          # pass the block on while computing with it
            incoming = torch.empty_like(kv)
            requests = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv, to_rank, group),
                                               dist.P2POp(dist.irecv, incoming, from_rank, group)])
        for qi, qc in enumerate(my_chunks):
            rows = slice(qi * chunk, (qi + 1) * chunk)
            for ki, kc in enumerate(chunks_of_rank(owner, cp, order)):
                if causal and kc > qc:
                    continue                       # hidden entirely by the mask: no work
                cols = slice(ki * chunk, (ki + 1) * chunk)
                s = (q[:, rows].to(acc) @ kv[0, :, cols].to(acc).transpose(-1, -2)) * scale
                if causal and kc == qc:
                    s = s.masked_fill(diagonal_mask, float("-inf"))
                m_new = torch.maximum(m[:, rows], s.amax(dim=-1, keepdim=True))
                p = torch.exp(s - m_new)
                correction = torch.exp(m[:, rows] - m_new)
                l[:, rows] = l[:, rows] * correction + p.sum(dim=-1, keepdim=True)
                o[:, rows] = o[:, rows] * correction + p @ kv[1, :, cols].to(acc)
                m[:, rows] = m_new
        for request in requests:
            request.wait()
        if incoming is not None:
            kv = incoming
    return (o / l).to(q.dtype)
