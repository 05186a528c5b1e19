"""Chapter 0 warm-up exercises — reference solutions."""
import torch
import torch.distributed as dist


def sum_of_ranks(rank: int, world_size: int) -> int:
    """Exercise 0.1 — every rank returns 0 + 1 + ... + (world_size - 1), computed with ONE all_reduce."""
    t = torch.tensor([rank], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def ring_pass(rank: int, world_size: int, value: torch.Tensor) -> torch.Tensor:
    """Exercise 0.2 — send `value` to the next rank and return what the previous rank sent."""
    if world_size == 1:
        return value.clone()
    received = torch.empty_like(value)
    ops = [dist.P2POp(dist.isend, value.contiguous(), (rank + 1) % world_size),
           dist.P2POp(dist.irecv, received, (rank - 1) % world_size)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    return received
