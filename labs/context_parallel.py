"""Chapter 8, part B: context parallelism (ring attention). Sequence parallelism (exercise 8.3) is in
sequence_parallel.py.

Exercise 8.4  `ring_attention`: causal attention over a prompt whose sequence is split over the ranks of a
              group. Each rank keeps its queries; the K/V blocks travel around the ring by point-to-point
              messages, and each rank folds every block into its running result with online-softmax
              rescaling. The layout (which rows a rank holds) is given in helpers/course/ring_attention.py.

Shapes: attention tensors are [heads, seq, head_dim].
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from helpers.course.ring_attention import ORDERS, chunks_of_rank


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, causal: bool = True,
                   order: str = "zigzag") -> torch.Tensor:
    """Attention of this rank's queries over the whole sequence, the sequence split over the ranks of `group`.

    q, k, v: [heads, seq/cp, head_dim], this rank's rows in the layout `order` of helpers/course/ring_attention.py
    (the 2·cp chunks of seq/(2·cp) tokens; "zigzag": rank i holds chunks i and 2cp-1-i; "contiguous": chunks
    2i and 2i+1), where cp is the group size. Returns [heads, seq/cp, head_dim]: softmax(q kᵀ/√d, causal
    mask by GLOBAL position) v for this rank's queries, equal to full attention's rows at these positions.

    The mechanism: cp steps. At each step the rank attends to the K/V block it holds, while that block is
    passed on to the next rank of the ring and the previous rank's block arrives (point-to-point, never a
    collective of the full K/V). Overlap is part of the answer: post each step's transfer with dist.isend /
    dist.irecv or dist.batch_isend_irecv BEFORE computing with the block you hold, and wait() for it only
    after, so every step but the last computes while a transfer is in flight (a blocking send/recv cannot
    overlap; the grader measures this with helpers.course.ring_attention.TransferOverlap). Each rank sends
    cp-1 blocks (its own K and V, then the ones it received; the last block is not forwarded) and nothing
    else. Each block is folded in with online-softmax rescaling: keep per query row the running max m, the
    running sum l and the unnormalised output o; for a block with scores s, m' = max(m, rowmax s),
    l = l·e^(m-m') + Σ e^(s-m'), o = o·e^(m-m') + e^(s-m') v; at the end out = o / l. With causal=True, skip
    every (query chunk, key chunk) pair the mask hides entirely (key chunk after query chunk) and mask the
    diagonal pairs: the skipped work is what the zigzag order balances. Accumulate in at least float32;
    return q's dtype.

    Raises ValueError when q, k, v are not 3-D with equal shapes, when seq/cp is odd (each rank holds two
    chunks), or when order is not one of ORDERS."""
    raise NotImplementedError("Exercise 8.4: ring_attention is not written yet "
                              "(labs/context_parallel.py)")

