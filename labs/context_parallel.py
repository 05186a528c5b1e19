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


def scatter_to_sequence_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Enter the sequence-parallel region from a tensor every rank holds whole (e.g. the embeddings).

    x: [seq, ...], the same on every rank of `group`. Forward: this rank's contiguous rows
    [rank·seq/n, (rank+1)·seq/n) — no communication. Backward: all-gather the gradient along the sequence
    (each rank's rows influenced only its own slice of x).
    Raises ValueError when seq is not divisible by the group size."""
    raise NotImplementedError("Exercise 8.3: scatter_to_sequence_parallel_region is not written yet "
                              "(labs/context_parallel.py)")


def gather_from_sequence_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Leave the sequence-parallel region before a column-parallel layer (after the norm).

    x: [seq/n, ...], this rank's rows. Forward: all-gather along the sequence -> [seq, ...], rows in rank
    order. Backward: REDUCE-SCATTER the gradient: every rank's column-parallel layer produced a partial
    dL/d(gathered x) for all seq rows, so the sum over ranks is the true gradient, and each rank keeps its rows.
    (The conjugate of reduce_scatter_to_sequence_parallel_region.)"""
    raise NotImplementedError("Exercise 8.3: gather_from_sequence_parallel_region is not written yet "
                              "(labs/context_parallel.py)")


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Enter the sequence-parallel region after a row-parallel layer: where plain TP all-reduces.

    x: [seq, ...], this rank's PARTIAL sum for all seq rows. Forward: reduce-scatter -> [seq/n, ...], the
    summed rows this rank owns. Backward: all-gather the gradient along the sequence.
    Raises ValueError when seq is not divisible by the group size."""
    raise NotImplementedError("Exercise 8.3: reduce_scatter_to_sequence_parallel_region is not written yet "
                              "(labs/context_parallel.py)")


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
    raise NotImplementedError("Exercise 8.4: ring_attention is not written yet "
                              "(labs/context_parallel.py)")

