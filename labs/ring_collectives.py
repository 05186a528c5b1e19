"""Chapter 1 — collectives built by hand from point-to-point messages.

Run them from notebooks/01_collectives.ipynb; grade them with `make grade CHAPTER=1`.
Each exercise has the signature of the PyTorch collective it imitates, so the grader checks it against
the real thing on many shapes, dtypes and world sizes 1-4:

    ring_all_reduce(tensor, op, group)              ~ dist.all_reduce(tensor, op, group)          (in place)
    ring_all_gather(output, input, group)           ~ dist.all_gather_single(output, input, group)
    ring_reduce_scatter(output, input, op, group)   ~ dist.reduce_scatter_single(output, input, op, group)
    recursive_doubling_all_reduce(tensor, op, group)  a latency-optimal all-reduce (log2 n steps)

Rules: use only point-to-point messages — dist.send / dist.recv, dist.isend / dist.irecv, or
dist.batch_isend_irecv([dist.P2POp(dist.isend, t, peer), dist.P2POp(dist.irecv, buf, peer)]) — and local
tensor arithmetic. No dist.all_reduce / all_gather / reduce_scatter / broadcast inside.
Peers are global ranks: with a sub-group, convert with dist.get_global_rank(group, group_rank).
A blocking send on every rank at once can deadlock: post the send and the receive together, then wait.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from helpers.course.partition import chunk_bounds  # given: the even split of a tensor into n chunks


def ring_all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """Exercise 1.1 — ring all-reduce from point-to-point messages only, in place, like dist.all_reduce.

    tensor: any shape and dtype, the same shape on every rank of `group`. On return every rank holds the
    elementwise reduction (op: SUM, AVG, PRODUCT, MAX or MIN) of all ranks' tensors, written into `tensor`,
    which is also returned. Any length works, including lengths not divisible by the group size (chunk
    sizes differ by one) and lengths smaller than it (some chunks are empty).
    Phases: reduce-scatter (n-1 steps), then all-gather (n-1 steps): each rank sends 2(n-1) messages, one
    chunk each, only to its ring neighbour (r+1 or r-1 in the group), and receives only from the other.
    Raise ValueError for any other op, and for AVG on a tensor that is not floating point.

    Hint: flatten (tensor.view(-1) of a contiguous tensor shares its memory), split with chunk_bounds.
    Reduce-scatter step s: rank r sends chunk (r-s) mod n to r+1, receives chunk (r-s-1) mod n from r-1
    into a scratch buffer and reduces it into its own chunk. Afterwards rank r owns chunk (r+1) mod n.
    All-gather step s: send chunk (r+1-s) mod n, receive chunk (r-s) mod n straight into place.
    AVG: sum, then divide by n (floating-point tensors only, as dist.all_reduce).
    """
    raise NotImplementedError("Exercise 1.1: ring_all_reduce is not written yet (labs/ring_collectives.py)")


def ring_all_gather(output: torch.Tensor, input: torch.Tensor, group=None) -> torch.Tensor:
    """Exercise 1.2 — ring all-gather from point-to-point messages only, like dist.all_gather_single.

    input:  [m, *rest] on every rank (the same shape everywhere).
    output: [n * m, *rest]; on return output[i*m:(i+1)*m] is rank i's input, on every rank. Returned.
    n - 1 steps: step s sends the block this rank received at step s - 1 (its own block at step 0).
    Raise ValueError if output's shape is not [n * m, *rest].
    """
    raise NotImplementedError("Exercise 1.2: ring_all_gather is not written yet (labs/ring_collectives.py)")


def ring_reduce_scatter(output: torch.Tensor, input: torch.Tensor, op=dist.ReduceOp.SUM,
                        group=None) -> torch.Tensor:
    """Exercise 1.3 — ring reduce-scatter from point-to-point messages only, like dist.reduce_scatter_single.

    input:  [n * m, *rest] on every rank.
    output: [m, *rest]; on return rank i's output is the reduction over ranks of input[i*m:(i+1)*m]. Returned.
    `input` is not modified (work on a copy). op: SUM, AVG, PRODUCT, MAX or MIN.
    n - 1 steps of one block each, round the ring.
    Raise ValueError if input's shape is not [n * m, *rest], for any other op, and for AVG on integers.
    """
    raise NotImplementedError("Exercise 1.3: ring_reduce_scatter is not written yet (labs/ring_collectives.py)")


def recursive_doubling_all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """Exercise 1.4 (optional) — recursive-doubling all-reduce, in place, like dist.all_reduce.

    log2(n) steps; at step k rank r exchanges its whole partial result with rank r XOR 2^k and reduces.
    Latency: log2(n) messages instead of the ring's 2(n-1); bandwidth: log2(n)·S per rank instead of
    2(n-1)/n·S. So it wins for small messages and loses for large ones. Group sizes that are not a power
    of two: the `extra` ranks beyond the largest power of two p first fold their tensor into rank r - p,
    sit out the exchange, and get the result back at the end. Any group size works.
    Raise ValueError for an op other than SUM, AVG, PRODUCT, MAX, MIN, and for AVG on integers.
    """
    raise NotImplementedError("Exercise 1.4: recursive_doubling_all_reduce is not written yet "
                              "(labs/ring_collectives.py)")


def ring_all_reduce_demo(rank: int, world_size: int, numel: int = 10) -> list:
    """Worker for torchrun (see helpers/run.py): ring all-reduce of [rank+1]*numel; every rank returns
    [n(n+1)/2]*numel."""
    from helpers import rank_device
    t = torch.full((numel,), float(rank + 1), device=rank_device())
    ring_all_reduce(t)
    return t.tolist()
