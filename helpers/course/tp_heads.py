"""Which attention heads a tensor-parallel rank owns, and cutting those heads out of a projection.

Given code for chapter 2 (labs and solutions import it): attention is split by heads, so rank r keeps
query heads [r*h/n, (r+1)*h/n) and the key/value heads those queries read. With grouped-query attention
there are fewer KV heads than query heads, and when the TP degree exceeds their number each KV head is
replicated on several ranks, as vLLM does.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers.course.tp_regions import copy_to_tensor_model_parallel_region

__all__ = ["kv_heads_for_rank", "check_llama_tp", "head_slice", "HeadSliceLinear"]


def check_llama_tp(config, world_size: int) -> None:
    """Raise ValueError, naming the config field, when a Llama config cannot be split over `world_size` ranks
    by the Megatron plan (query heads, KV heads split or replicated, MLP width, vocabulary). Call it BEFORE
    replacing any module: a check that fails half-way through sharding leaves a model that is neither whole nor
    sharded (some layers cut, others not), which no later call can use or repair."""
    kv_heads_for_rank(config.num_attention_heads, config.num_key_value_heads, 0, world_size)  # heads, KV heads
    for name in ("intermediate_size", "vocab_size"):
        size = getattr(config, name)
        if size % world_size:
            raise ValueError(f"{name}={size} (the model's config) is not divisible by world_size={world_size}: "
                             f"choose a tensor-parallel degree that divides {name}")


def kv_heads_for_rank(num_heads: int, num_kv_heads: int, rank: int, world_size: int) -> tuple[int, int]:
    """Which KV heads rank `rank` needs: (first, count). Used by ParallelAttention and the Llama TP plan.

    world_size divides num_kv_heads: each rank owns num_kv_heads / world_size of them (no copies).
    num_kv_heads divides world_size: each KV head is REPLICATED on world_size / num_kv_heads ranks, each
    rank keeping the one its query heads read (what vLLM does when TP > number of KV heads).
    Anything else cannot be split by heads: a ValueError says so."""
    if num_heads % world_size:
        raise ValueError(f"num_heads={num_heads} is not divisible by world_size={world_size}: attention is "
                         "split by heads, so the tensor-parallel degree must divide the number of heads")
    if num_kv_heads % world_size == 0:
        per_rank = num_kv_heads // world_size
        return rank * per_rank, per_rank
    if world_size % num_kv_heads == 0:
        return rank // (world_size // num_kv_heads), 1
    raise ValueError(f"num_kv_heads={num_kv_heads} is not divisible by world_size={world_size}, nor "
                     f"world_size by num_kv_heads: KV heads can be neither split nor replicated evenly; "
                     f"use a tensor-parallel degree that divides {num_kv_heads} or is a multiple of it")


class HeadSliceLinear(nn.Linear):
    """The output rows of some heads of a full projection, on a rank that holds the full input x.

    forward: x -> copy_to_tensor_model_parallel_region (identity) -> x Wᵀ + b. Like ColumnParallelLinear,
    this rank's heads see the full x but produce only part of dL/dx; the operator's backward all-reduces
    that part over `group`, so every rank gets the whole dL/dx. Without it, dL/dx misses the other ranks'
    share of K and V (and every layer before attention trains on a wrong gradient)."""

    group = None        # the tensor-parallel group (None: all ranks); set by head_slice

    def forward(self, x):
        return F.linear(copy_to_tensor_model_parallel_region(x, self.group), self.weight, self.bias)


def head_slice(linear: nn.Linear, first_head: int, heads: int, head_dim: int, group=None) -> HeadSliceLinear:
    """A HeadSliceLinear holding output rows of heads [first_head, first_head + heads) of `linear`,
    whose backward all-reduces its share of dL/dx over `group` (the tensor-parallel group; None: all ranks).
    For K/V heads: split ones (each on one rank) and replicated ones (the same head on several ranks: each
    replica's weight gradient then holds only its own query heads' part; the sum over the replicas is the
    full gradient)."""
    rows = slice(first_head * head_dim, (first_head + heads) * head_dim)
    out = HeadSliceLinear(linear.in_features, heads * head_dim, bias=linear.bias is not None,
                          dtype=linear.weight.dtype)
    out.group = group
    with torch.no_grad():
        out.weight.copy_(linear.weight[rows])
        if linear.bias is not None:
            out.bias.copy_(linear.bias[rows])
    return out
