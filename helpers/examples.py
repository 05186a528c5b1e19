"""Small worker functions used by chapter 0, the torchrun tests and the launcher benchmark."""
import torch
import torch.distributed as dist


def all_reduce_demo(rank, world_size):
    """Every rank contributes [rank+1, rank+1]; all_reduce leaves the sum on every rank."""
    t = torch.tensor([rank + 1.0] * 2)
    dist.all_reduce(t)
    print(t)
    return t


def whoami(rank, world_size):
    """What torchrun (or launch) told this process about itself."""
    import os
    return {"rank": rank, "world_size": world_size, "local_rank": int(os.environ["LOCAL_RANK"]),
            "backend": dist.get_backend()}


def chapter_check(rank, world_size):
    """A chapter-style workload for the torchrun tests: the exercises of chapter 0, checked on every rank."""
    from helpers import load_impl
    warmup = load_impl("warmup")
    total = warmup.sum_of_ranks(rank, world_size)
    assert total == world_size * (world_size - 1) // 2, total
    got = warmup.ring_pass(rank, world_size, torch.tensor([float(rank)]))
    assert got.item() == (rank - 1) % world_size, got
    return f"ok: sum_of_ranks={total}, ring_pass got {int(got.item())}"
