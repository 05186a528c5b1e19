"""Chapter 0 warm-up exercises: your first collective and your first point-to-point exchange.

Run them from notebooks/00_processes_and_ranks.ipynb; grade them with `make grade CHAPTER=0`.
"""
import torch
import torch.distributed as dist


def sum_of_ranks(rank: int, world_size: int) -> int:
    """Exercise 0.1 — every rank returns 0 + 1 + ... + (world_size - 1), computed with ONE all_reduce.

    Put this rank's id into a tensor, all_reduce it (SUM), return the result as a Python int.
    Do not use the formula n(n-1)/2: the point is to make the ranks talk.
    """
    t = torch.tensor([rank], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def ring_pass(rank: int, world_size: int, value: torch.Tensor) -> torch.Tensor:
    """Exercise 0.2 — send `value` to the next rank, (rank + 1) % world_size, and return the tensor
    received from the previous rank, (rank - 1) % world_size. Same shape and dtype as `value`.

    Every rank sends and receives at once: a blocking send on every rank first would deadlock on
    backends without buffering. Use dist.isend/dist.irecv (or dist.batch_isend_irecv) and wait on both.
    With world_size == 1 the rank is its own neighbour: return a copy of `value`.
    """
    if world_size == 1:
        return value.clone()
    received = torch.empty_like(value)
    ops = [dist.P2POp(dist.isend, value.contiguous(), (rank + 1) % world_size),
           dist.P2POp(dist.irecv, received, (rank - 1) % world_size)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return received
