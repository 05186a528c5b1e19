"""Megatron's tensor-parallel "region" operators and the rank bookkeeping every TP layer shares.

Given code for chapter 2: labs/tensor_parallel.py and solutions/tensor_parallel.py both import it, so the
exercises are only the layers. The operators come in conjugate pairs: what one does in the forward pass,
its partner does in the backward pass (megatron/core/tensor_parallel/mappings.py).

    operator                                   forward              backward
    copy_to_tensor_model_parallel_region       identity             all-reduce
    reduce_from_tensor_model_parallel_region   all-reduce           identity
    scatter_to_tensor_model_parallel_region    keep my slice        all-gather
    gather_from_tensor_model_parallel_region   all-gather           keep my slice

`dist.all_reduce` and `dist.all_gather` have no autograd of their own: right for inference, but training
through them needs these Functions, which say what the backward pass communicates.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ['group_rank_and_size', 'split_along_dim',
           'copy_to_tensor_model_parallel_region', 'reduce_from_tensor_model_parallel_region',
           'scatter_to_tensor_model_parallel_region', 'gather_from_tensor_model_parallel_region']


def group_rank_and_size(rank: int | None = None, world_size: int | None = None, group=None) -> tuple[int, int]:
    """This rank's position in `group` (default: all ranks). Explicit values must agree with the group."""
    if dist.is_initialized():
        actual = dist.get_rank(group), dist.get_world_size(group)
        if (rank is not None and rank != actual[0]) or (world_size is not None and world_size != actual[1]):
            raise ValueError(f"rank={rank}, world_size={world_size} do not match this process's place in the "
                             f"group (rank {actual[0]} of {actual[1]}); leave them out to use the group's")
        return actual
    if rank is None or world_size is None:
        raise ValueError("torch.distributed is not initialised: pass rank and world_size explicitly")
    return rank, world_size


def split_along_dim(tensor: torch.Tensor, dim: int, rank: int, world_size: int, name: str = "size") -> torch.Tensor:
    """Rank `rank`'s contiguous 1/world_size slice of `tensor` along `dim` (a copy, not a view)."""
    size = tensor.shape[dim]
    if size % world_size:
        raise ValueError(f"{name}={size} is not divisible by world_size={world_size}: choose a tensor-parallel "
                         f"degree that divides {name}")
    part = size // world_size
    return tensor.narrow(dim, rank * part, part).detach().clone().contiguous()


# ------------------------------------------------------------------------- the conjugate operators

def _all_reduce(x, group):
    if dist.get_world_size(group) == 1:
        return x
    x = x.clone()          # never modify a tensor autograd saved
    dist.all_reduce(x, group=group)
    return x


def _all_gather_last_dim(x, group):
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _my_slice_last_dim(x, group):
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    if world_size == 1:
        return x
    return split_along_dim(x, -1, rank, world_size, name="last dimension")


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _my_slice_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_last_dim(grad, ctx.group), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _my_slice_last_dim(grad, ctx.group), None


def copy_to_tensor_model_parallel_region(x, group=None):
    """Forward: identity (every rank already holds the full x). Backward: all-reduce the gradient, since
    each rank's shard contributed only part of dL/dx."""
    return _CopyToRegion.apply(x, group)


def reduce_from_tensor_model_parallel_region(x, group=None):
    """Forward: all-reduce (sum the partial results). Backward: identity."""
    return _ReduceFromRegion.apply(x, group)


def scatter_to_tensor_model_parallel_region(x, group=None):
    """Forward: keep this rank's slice of the last dimension. Backward: all-gather the gradient."""
    return _ScatterToRegion.apply(x, group)


def gather_from_tensor_model_parallel_region(x, group=None):
    """Forward: all-gather the last dimension. Backward: keep this rank's slice of the gradient."""
    return _GatherFromRegion.apply(x, group)
