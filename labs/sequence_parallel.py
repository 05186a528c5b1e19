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


def scatter_to_sequence_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Enter the sequence-parallel region from a tensor every rank holds whole (e.g. the embeddings).

    x: [seq, ...], the same on every rank of `group`. Forward: this rank's contiguous rows
    [rank·seq/n, (rank+1)·seq/n) — no communication. Backward: all-gather the gradient along the sequence
    (each rank's rows influenced only its own slice of x).
    Raises ValueError when seq is not divisible by the group size."""
    raise NotImplementedError("Exercise 8.3: scatter_to_sequence_parallel_region is not written yet "
                              "(labs/sequence_parallel.py)")


def gather_from_sequence_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Leave the sequence-parallel region before a column-parallel layer (after the norm).

    x: [seq/n, ...], this rank's rows. Forward: all-gather along the sequence -> [seq, ...], rows in rank
    order. Backward: REDUCE-SCATTER the gradient: every rank's column-parallel layer produced a partial
    dL/d(gathered x) for all seq rows, so the sum over ranks is the true gradient, and each rank keeps its rows.
    (The conjugate of reduce_scatter_to_sequence_parallel_region.)"""
    raise NotImplementedError("Exercise 8.3: gather_from_sequence_parallel_region is not written yet "
                              "(labs/sequence_parallel.py)")


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Enter the sequence-parallel region after a row-parallel layer: where plain TP all-reduces.

    x: [seq, ...], this rank's PARTIAL sum for all seq rows. Forward: reduce-scatter -> [seq/n, ...], the
    summed rows this rank owns. Backward: all-gather the gradient along the sequence.
    Raises ValueError when seq is not divisible by the group size."""
    raise NotImplementedError("Exercise 8.3: reduce_scatter_to_sequence_parallel_region is not written yet "
                              "(labs/sequence_parallel.py)")
