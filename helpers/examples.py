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
