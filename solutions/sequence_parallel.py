"""Chapter 8, part B: sequence parallelism.

Exercise 8.3  The sequence-parallel region (Megatron-LM, "Reducing Activation Recomputation in Large
              Transformer Models"): outside the tensor-parallel matmuls (around the norms, the residual, the
              dropout) every rank keeps only its 1/n of the tokens. The TP all-reduce after a row-parallel
              layer becomes a reduce-scatter along the sequence, and the input of a column-parallel layer is
              all-gathered along the sequence. Three autograd operators, each with its conjugate backward:

    operator                                      forward                    backward
    scatter_to_sequence_parallel_region           keep my rows               all-gather
    gather_from_sequence_parallel_region          all-gather                 reduce-scatter
    reduce_scatter_to_sequence_parallel_region    reduce-scatter             all-gather

Shapes: sequence-parallel tensors are [seq, ...] (sequence first, Megatron's [s, b, h]). The block that uses them
is given in helpers/course/sequence_parallel.py; ring attention (context parallelism) is in context_parallel.py.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


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
