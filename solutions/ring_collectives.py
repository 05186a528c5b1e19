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

# How this reference answer works.
#
# The ring: rank r sends only to r+1 and receives only from r-1. Each step every rank sends one chunk and
# receives one chunk at the same time (batch_isend_irecv), so every link is busy every step:
#   reduce-scatter phase, n-1 steps: step s sends chunk (r-s) mod n, receives chunk (r-s-1) mod n and
#       reduces it into its own copy; afterwards rank r owns the full reduction of chunk (r+1) mod n.
#   all-gather phase, n-1 steps: step s sends chunk (r+1-s) mod n and receives chunk (r-s) mod n
#       straight into place.
# Both phases are pipelined: chunks travel in segments of at most 1 MB, two in flight (see _stream).
# Each rank sends 2(n-1)/n of the tensor in all — independent of n, which is why NCCL uses rings for
# large messages — but pays 2(n-1) message latencies, which is why latency-bound sizes use other algorithms
# (trees across nodes; one-shot or NVLink-SHARP all-reduce inside a node, as serving engines do).
from __future__ import annotations

import collections

import torch
import torch.distributed as dist

from helpers.course.partition import chunk_bounds  # given: the even split of a tensor into n chunks

# The reductions a ring can do chunk by chunk: associative and commutative elementwise ops.
_REDUCE = {
    dist.ReduceOp.SUM: lambda acc, x: acc.add_(x),
    dist.ReduceOp.AVG: lambda acc, x: acc.add_(x),          # sum on the wire, divide by n at the end
    dist.ReduceOp.PRODUCT: lambda acc, x: acc.mul_(x),
    dist.ReduceOp.MAX: lambda acc, x: torch.maximum(acc, x, out=acc),
    dist.ReduceOp.MIN: lambda acc, x: torch.minimum(acc, x, out=acc),
}


def _check_op(op, dtype):
    if op not in _REDUCE:
        raise ValueError(f"op={op} is not supported: use SUM, AVG, PRODUCT, MAX or MIN")
    if op == dist.ReduceOp.AVG and not (dtype.is_floating_point or dtype.is_complex):
        raise ValueError(f"op=AVG needs a floating-point tensor, got {dtype} (dist.all_reduce refuses it too)")


def _ring(group):
    """(my rank in the group, group size, global rank of the next rank, global rank of the previous rank)."""
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
    return rank, n, to_global((rank + 1) % n), to_global((rank - 1) % n)


def _exchange(send: torch.Tensor, dst: int, recv: torch.Tensor, src: int, group) -> list:
    """Post `send` to dst and a receive of `recv` from src together (one batch: under NCCL a lone send to
    the next rank and a lone receive from the previous one would wait on each other around the ring).
    Returns the works to wait on. Empty chunks (tensors shorter than the ring) are skipped on both
    sides: both ends compute the same chunk sizes."""
    ops = []
    if send.numel():
        ops.append(dist.P2POp(dist.isend, send, dst, group))
    if recv.numel():
        ops.append(dist.P2POp(dist.irecv, recv, src, group))
    return dist.batch_isend_irecv(ops) if ops else []


# Pipelining. A chunk is cut into segments of at most _SEGMENT_BYTES and up to _IN_FLIGHT segments travel at
# once, so the wire is busy while the previous segment is being reduced (gloo's own ring does the same).
# One message per chunk would leave each link idle during every reduction, and every rank waiting for
# the slowest at every step.
_SEGMENT_BYTES = 1 << 20
_IN_FLIGHT = 2


def _segments(bounds, element_size):
    """Cut every chunk into the same number k of segments: returns (k, segs) with segs[chunk][j] = (start, stop)."""
    biggest = max(b - a for a, b in bounds)
    k = max(1, -(-biggest * element_size // _SEGMENT_BYTES))
    return k, [[(a + x, a + y) for x, y in chunk_bounds(b - a, k)] for a, b in bounds]


def _stream(flat, plan, k, nxt, prev, group, reduce=None):
    """Run a ring phase. plan[i] = ((send start, stop), (recv start, stop)) for i = step * k + segment.
    Iteration i sends what iteration i - k received, so that one must be finished first. Received data
    goes straight into place (all-gather) or into a scratch slot that is then reduced into place."""
    depth = min(_IN_FLIGHT, k)
    if reduce is not None:
        seg_max = max(r1 - r0 for _, (r0, r1) in plan)
        scratch = torch.empty(depth, seg_max, dtype=flat.dtype, device=flat.device)
    pending = collections.deque()   # (iteration, recv range, scratch slot, works)

    def finish_oldest():
        _, (r0, r1), slot, works = pending.popleft()
        for work in works:
            work.wait()
        if reduce is not None and r1 > r0:
            reduce(flat[r0:r1], scratch[slot, : r1 - r0])

    for i, ((s0, s1), (r0, r1)) in enumerate(plan):
        while pending and (len(pending) >= depth or pending[0][0] <= i - k):
            finish_oldest()
        slot = i % depth
        into = flat[r0:r1] if reduce is None else scratch[slot, : r1 - r0]
        pending.append((i, (r0, r1), slot, _exchange(flat[s0:s1], nxt, into, prev, group)))
    while pending:
        finish_oldest()


def _ring_reduce_scatter_flat(flat: torch.Tensor, bounds, op, group) -> int:
    """Reduce-scatter phase on a flat contiguous buffer, in place. Step s (0..n-2): send chunk (r-s) mod n
    to r+1, receive chunk (r-s-1) mod n from r-1 and reduce it into place. Returns the index of the chunk
    this rank now holds fully reduced: (rank + 1) mod n."""
    rank, n, nxt, prev = _ring(group)
    k, segs = _segments(bounds, flat.element_size())
    plan = [(segs[(rank - s) % n][j], segs[(rank - s - 1) % n][j]) for s in range(n - 1) for j in range(k)]
    _stream(flat, plan, k, nxt, prev, group, reduce=_REDUCE[op])
    return (rank + 1) % n


def _ring_all_gather_flat(flat: torch.Tensor, bounds, owned: int, group) -> None:
    """All-gather phase on a flat buffer: rank r starts owning chunk `owned`, ends holding all chunks.
    Step s: send chunk (owned-s) mod n, receive chunk (owned-s-1) mod n straight into place (no copy)."""
    rank, n, nxt, prev = _ring(group)
    k, segs = _segments(bounds, flat.element_size())
    plan = [(segs[(owned - s) % n][j], segs[(owned - s - 1) % n][j]) for s in range(n - 1) for j in range(k)]
    _stream(flat, plan, k, nxt, prev, group)


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
    _check_op(op, tensor.dtype)
    n = dist.get_world_size(group)
    # Work on a flat contiguous view so every chunk is a contiguous slice (no copies on the wire).
    flat = tensor.view(-1) if tensor.is_contiguous() else tensor.contiguous().view(-1)
    if n > 1:
        bounds = chunk_bounds(flat.numel(), n)
        owned = _ring_reduce_scatter_flat(flat, bounds, op, group)
        _ring_all_gather_flat(flat, bounds, owned, group)
    if op == dist.ReduceOp.AVG:
        flat.div_(n)
    if not tensor.is_contiguous():
        tensor.copy_(flat.view(tensor.shape))
    return tensor


def ring_all_gather(output: torch.Tensor, input: torch.Tensor, group=None) -> torch.Tensor:
    """Exercise 1.2 — ring all-gather from point-to-point messages only, like dist.all_gather_single.

    input:  [m, *rest] on every rank (the same shape everywhere).
    output: [n * m, *rest]; on return output[i*m:(i+1)*m] is rank i's input, on every rank. Returned.
    n - 1 steps: step s sends the block this rank received at step s - 1 (its own block at step 0).
    Raise ValueError if output's shape is not [n * m, *rest].
    """
    n = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if output.shape[0] != n * input.shape[0] or output.shape[1:] != input.shape[1:]:
        raise ValueError(f"output has shape {tuple(output.shape)}, expected {(n * input.shape[0], *input.shape[1:])} "
                         f"(world_size={n} blocks of input's shape {tuple(input.shape)})")
    out = output if output.is_contiguous() else torch.empty_like(output, memory_format=torch.contiguous_format)
    flat = out.view(-1)
    block = input.numel()
    bounds = [(i * block, (i + 1) * block) for i in range(n)]
    flat[rank * block:(rank + 1) * block].copy_(input.reshape(-1))
    _ring_all_gather_flat(flat, bounds, rank, group)
    if out is not output:
        output.copy_(out)
    return output


def ring_reduce_scatter(output: torch.Tensor, input: torch.Tensor, op=dist.ReduceOp.SUM,
                        group=None) -> torch.Tensor:
    """Exercise 1.3 — ring reduce-scatter from point-to-point messages only, like dist.reduce_scatter_single.

    input:  [n * m, *rest] on every rank.
    output: [m, *rest]; on return rank i's output is the reduction over ranks of input[i*m:(i+1)*m]. Returned.
    `input` is not modified (work on a copy). op: SUM, AVG, PRODUCT, MAX or MIN.
    n - 1 steps of one block each, round the ring.
    Raise ValueError if input's shape is not [n * m, *rest], for any other op, and for AVG on integers.
    """
    _check_op(op, input.dtype)
    n = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if input.shape[0] != n * output.shape[0] or input.shape[1:] != output.shape[1:]:
        raise ValueError(f"input has shape {tuple(input.shape)}, expected {(n * output.shape[0], *output.shape[1:])} "
                         f"(world_size={n} blocks of output's shape {tuple(output.shape)})")
    flat = input.reshape(-1).clone()
    block = output.numel()
    bounds = [(i * block, (i + 1) * block) for i in range(n)]
    # Shift the ring by one so that the chunk a rank ends up owning, (rank+1) mod n in _ring_reduce_scatter_flat,
    # is its own block: relabel chunk i as chunk i+1.
    shifted = bounds[-1:] + bounds[:-1]
    if n > 1:
        _ring_reduce_scatter_flat(flat, shifted, op, group)
    mine = flat[rank * block:(rank + 1) * block]
    if op == dist.ReduceOp.AVG:
        mine.div_(n)
    output.copy_(mine.view(output.shape))
    return output


def recursive_doubling_all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
    """Exercise 1.4 (optional) — recursive-doubling all-reduce, in place, like dist.all_reduce.

    log2(n) steps; at step k rank r exchanges its whole partial result with rank r XOR 2^k and reduces.
    Latency: log2(n) messages instead of the ring's 2(n-1); bandwidth: log2(n)·S per rank instead of
    2(n-1)/n·S. So it wins for small messages and loses for large ones. Group sizes that are not a power
    of two: the `extra` ranks beyond the largest power of two p first fold their tensor into rank r - p,
    sit out the exchange, and get the result back at the end. Any group size works.
    Raise ValueError for an op other than SUM, AVG, PRODUCT, MAX, MIN, and for AVG on integers.
    """
    _check_op(op, tensor.dtype)
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
    reduce = _REDUCE[op]
    buf = tensor.contiguous().clone() if not tensor.is_contiguous() else tensor
    p = 1 << (n.bit_length() - 1)  # largest power of two <= n
    incoming = torch.empty_like(buf)
    if rank >= p:                                           # fold into a partner below p
        dist.send(buf, to_global(rank - p), group)
    elif rank + p < n:
        dist.recv(incoming, to_global(rank + p), group)
        reduce(buf, incoming)
    if rank < p:
        distance = 1
        while distance < p:
            peer = rank ^ distance
            for work in _exchange(buf, to_global(peer), incoming, to_global(peer), group):
                work.wait()
            reduce(buf, incoming)
            distance *= 2
    if rank >= p:                                           # get the result back
        dist.recv(buf, to_global(rank - p), group)
    elif rank + p < n:
        dist.send(buf, to_global(rank + p), group)
    if op == dist.ReduceOp.AVG:
        buf.div_(n)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def ring_all_reduce_demo(rank: int, world_size: int, numel: int = 10) -> list:
    """Worker for torchrun (see helpers/run.py): ring all-reduce of [rank+1]*numel; every rank returns
    [n(n+1)/2]*numel."""
    from helpers import rank_device
    t = torch.full((numel,), float(rank + 1), device=rank_device())
    ring_all_reduce(t)
    return t.tolist()
