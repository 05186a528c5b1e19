"""Chapter 2 — tensor parallelism, Megatron-style: exercises 2.1–2.5 (2.5 with labs/tp_llama.py).

Run them from notebooks/02_tensor_parallel.ipynb; grade them with `make grade CHAPTER=2`.
Given (read them first): the four region operators and rank bookkeeping (helpers/course/tp_regions.py), which
heads a rank owns and `head_slice` (helpers/course/tp_heads.py: its forward applies
copy_to_tensor_model_parallel_region, like ColumnParallelLinear's), and ParallelTransformerBlock.
To write: the classes and functions whose body raises NotImplementedError.

Every layer is built FROM a full reference layer (`from_linear`, `from_mlp`, ...) and keeps only this
rank's shard, so its output can be compared with the unsharded layer. Every layer takes an optional
`group` (a `dist.new_group(...)` process group; default: all ranks), so tensor parallelism can run inside
a sub-group (hybrid parallelism); `rank` and `world_size` are then the position inside that group.

The four "region" operators are Megatron's (megatron/core/tensor_parallel/mappings.py). They come in
conjugate pairs: what one does in the forward pass, its partner does in the backward pass.

    operator                                   forward              backward
    copy_to_tensor_model_parallel_region       identity             all-reduce
    reduce_from_tensor_model_parallel_region   all-reduce           identity
    scatter_to_tensor_model_parallel_region    keep my slice        all-gather
    gather_from_tensor_model_parallel_region   all-gather           keep my slice
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from helpers.course.transformer_layers import causal_attention

__all__ = ["group_rank_and_size", "split_along_dim",
           "copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
           "scatter_to_tensor_model_parallel_region", "gather_from_tensor_model_parallel_region",
           "ColumnParallelLinear", "RowParallelLinear", "ParallelMLP", "ParallelAttention",
           "ParallelTransformerBlock", "VocabParallelEmbedding", "parallel_argmax"]


from helpers.course.tp_heads import head_slice, kv_heads_for_rank  # given: which heads a rank owns
from helpers.course.tp_regions import (  # given: the region operators and rank bookkeeping
    group_rank_and_size,
    split_along_dim,
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
)


# ------------------------------------------------------------------------------------ the layers

class ColumnParallelLinear(nn.Module):
    """Exercise 2.1 — y = x Wᵀ + b with W [out_features, in_features] (nn.Linear's layout) split along
    the OUTPUT features: the columns of A = Wᵀ in Megatron's Y = XA, i.e. the rows of W.

    Rank r holds rows [r·out/n, (r+1)·out/n) of W as `self.weight` [out_features / n, in_features] and the
    same slice of the bias as `self.bias` (or None). x: [..., in_features] (full, on every rank)
    -> y: [..., out_features] if gather_output, else this rank's slice [..., out_features / world_size]
    (to feed a RowParallelLinear).
    forward: x -> copy_to_tensor_model_parallel_region -> local linear -> (gather_from_... if gather_output).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = True,
                 group=None, rank: int | None = None, world_size: int | None = None):
        """An empty shard of the right shape (from_linear fills it). rank/world_size: this rank's place in
        `group` (default: taken from the group; pass both when torch.distributed is not initialised).
        Sets self.rank, self.world_size, self.group, self.gather_output, self.in_features,
        self.out_features, self.out_per_rank. Raises ValueError("out_features=10 is not divisible by
        world_size=4 ...") when the split is uneven."""
        super().__init__()
        self.rank, self.world_size = group_rank_and_size(rank, world_size, group)
        if out_features % self.world_size:
            raise ValueError(f"out_features={out_features} is not divisible by world_size={self.world_size}: "
                             "choose a tensor-parallel degree that divides out_features")
        self.in_features, self.out_features = in_features, out_features
        self.out_per_rank = out_features // self.world_size
        self.gather_output, self.group = gather_output, group
        self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features))
        self.bias = nn.Parameter(torch.zeros(self.out_per_rank)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None, world_size: int | None = None,
                    group=None, gather_output: bool = True) -> "ColumnParallelLinear":
        """This rank's shard of a full `nn.Linear` (the same full layer on every rank)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    gather_output=gather_output, group=group, rank=rank, world_size=world_size)
        with torch.no_grad():
            layer.weight.copy_(split_along_dim(linear.weight, 0, layer.rank, layer.world_size, "out_features"))
            if linear.bias is not None:
                layer.bias.copy_(split_along_dim(linear.bias, 0, layer.rank, layer.world_size, "out_features"))
        return layer.to(linear.weight.dtype)

    def forward(self, x):
        x = copy_to_tensor_model_parallel_region(x, self.group)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_tensor_model_parallel_region(y, self.group) if self.gather_output else y

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"({self.out_per_rank} on rank {self.rank} of {self.world_size}), gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """Exercise 2.2 — y = x Wᵀ + b with W [out_features, in_features] split along the INPUT features: the
    rows of A = Wᵀ in Megatron's Y = XA, i.e. the columns of W.

    Rank r holds columns [r·in/n, (r+1)·in/n) of W as `self.weight` [out_features, in_features / n]; the
    bias `self.bias` [out_features] (or None) is whole on every rank and added ONCE, after the all-reduce (adding it
    before would count it world_size times).
    x: [..., in_features / world_size] if input_is_parallel (e.g. a ColumnParallelLinear's output with
    gather_output=False), else the full [..., in_features], of which the layer keeps its own slice.
    y: [..., out_features], the same on every rank.
    forward: (scatter_to_... unless input_is_parallel) -> local linear, no bias -> reduce_from_... -> + bias.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = False,
                 group=None, rank: int | None = None, world_size: int | None = None):
        """An empty shard of the right shape (from_linear fills it); rank/world_size as in
        ColumnParallelLinear. Sets self.rank, self.world_size, self.group, self.input_is_parallel,
        self.in_features, self.out_features, self.in_per_rank. Raises ValueError("in_features=6 is not
        divisible by world_size=4 ...") when the split is uneven."""
        super().__init__()
        self.rank, self.world_size = group_rank_and_size(rank, world_size, group)
        if in_features % self.world_size:
            raise ValueError(f"in_features={in_features} is not divisible by world_size={self.world_size}: "
                             "choose a tensor-parallel degree that divides in_features")
        self.in_features, self.out_features = in_features, out_features
        self.in_per_rank = in_features // self.world_size
        self.input_is_parallel, self.group = input_is_parallel, group
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None, world_size: int | None = None,
                    group=None, input_is_parallel: bool = False) -> "RowParallelLinear":
        """This rank's shard of a full `nn.Linear` (the same full layer on every rank)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    input_is_parallel=input_is_parallel, group=group, rank=rank, world_size=world_size)
        with torch.no_grad():
            layer.weight.copy_(split_along_dim(linear.weight, 1, layer.rank, layer.world_size, "in_features"))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer.to(linear.weight.dtype)

    def forward(self, x):
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, self.group)
        y = reduce_from_tensor_model_parallel_region(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self):
        return (f"in_features={self.in_features} ({self.in_per_rank} on rank {self.rank} of {self.world_size}), "
                f"out_features={self.out_features}, input_is_parallel={self.input_is_parallel}")


class ParallelMLP(nn.Module):
    """Exercise 2.3 — the Megatron MLP: fc1 column-parallel (gather_output=False) -> GELU on the local
    slice -> fc2 row-parallel (input_is_parallel=True). ONE all-reduce per forward pass, none between the
    two layers. Built from a `helpers.course.transformer_layers.MLP` (attributes fc1, fc2). x, y: [..., hidden]."""

    def __init__(self, fc1: ColumnParallelLinear, fc2: RowParallelLinear):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    @classmethod
    def from_mlp(cls, mlp: nn.Module, rank: int | None = None, world_size: int | None = None,
                 group=None) -> "ParallelMLP":
        fc1 = ColumnParallelLinear.from_linear(mlp.fc1, rank, world_size, group=group, gather_output=False)
        fc2 = RowParallelLinear.from_linear(mlp.fc2, rank, world_size, group=group, input_is_parallel=True)
        return cls(fc1, fc2)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ParallelAttention(nn.Module):
    """Exercise 2.4 — attention split by heads. Rank r keeps query heads [r·H/n, (r+1)·H/n) (q_proj
    column-parallel, no gather), the KV heads those query heads read (k_proj, v_proj: see
    `kv_heads_for_rank`; replicated when world_size > num_kv_heads), and the matching input columns of
    o_proj (row-parallel, input_is_parallel=True). Each rank attends with its own heads; the single
    forward all-reduce is o_proj's. Built from a `helpers.course.transformer_layers.Attention`.
    x, y: [batch, seq, hidden]. Raises ValueError (from kv_heads_for_rank) when the heads cannot be split.

    Gradients equal the single-process ones: every projection that reads the full x goes through
    copy_to_tensor_model_parallel_region (q_proj: inside ColumnParallelLinear; k_proj, v_proj: inside
    `head_slice(..., group=group)`, or ColumnParallelLinear when world_size divides num_kv_heads), so the
    backward pass sums every rank's share of dL/dx, K and V included. A replicated KV head's weight gradient
    on each replica holds only its own query heads' part; the full gradient is the sum over the replicas."""

    def __init__(self, q_proj, k_proj, v_proj, o_proj, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim  # on this rank

    @classmethod
    def from_attention(cls, attn: nn.Module, rank: int | None = None, world_size: int | None = None,
                       group=None) -> "ParallelAttention":
        rank, world_size = group_rank_and_size(rank, world_size, group)
        first_kv, kv_count = kv_heads_for_rank(attn.num_heads, attn.num_kv_heads, rank, world_size)
        q_proj = ColumnParallelLinear.from_linear(attn.q_proj, rank, world_size, group=group, gather_output=False)
        o_proj = RowParallelLinear.from_linear(attn.o_proj, rank, world_size, group=group, input_is_parallel=True)
        k_proj, v_proj = (head_slice(p, first_kv, kv_count, attn.head_dim, group=group)  # copy_to inside
                          for p in (attn.k_proj, attn.v_proj))
        return cls(q_proj, k_proj, v_proj, o_proj, attn.num_heads // world_size, kv_count, attn.head_dim)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = causal_attention(q, k, v).transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(out)


class ParallelTransformerBlock(nn.Module):
    """A tensor-parallel pre-norm block (given: it only composes 2.3 and 2.4). Norms are replicated;
    two all-reduces per block (attention's o_proj, the MLP's fc2). x, y: [batch, seq, hidden]."""

    def __init__(self, norm1, attn, norm2, mlp):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp

    @classmethod
    def from_block(cls, block: nn.Module, rank: int | None = None, world_size: int | None = None,
                   group=None) -> "ParallelTransformerBlock":
        import copy
        return cls(copy.deepcopy(block.norm1), ParallelAttention.from_attention(block.attn, rank, world_size, group),
                   copy.deepcopy(block.norm2), ParallelMLP.from_mlp(block.mlp, rank, world_size, group))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VocabParallelEmbedding(nn.Module):
    """Part of exercise 2.5 — an embedding table split by vocabulary rows. Rank r holds token ids
    [r·V/n, (r+1)·V/n); it looks up the ids it owns, writes zeros for the others, and one all-reduce
    (reduce_from_...) sums the ranks' rows into the full embeddings.
    ids: [...] int64 -> [..., embedding_dim], the same on every rank."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group=None,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        self.rank, self.world_size = group_rank_and_size(rank, world_size, group)
        if num_embeddings % self.world_size:
            raise ValueError(f"num_embeddings={num_embeddings} is not divisible by world_size={self.world_size}: "
                             "pad the vocabulary or choose another tensor-parallel degree")
        self.num_embeddings, self.embedding_dim, self.group = num_embeddings, embedding_dim, group
        per_rank = num_embeddings // self.world_size
        self.vocab_start, self.vocab_end = self.rank * per_rank, (self.rank + 1) * per_rank
        self.weight = nn.Parameter(torch.empty(per_rank, embedding_dim))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, rank: int | None = None, world_size: int | None = None,
                       group=None) -> "VocabParallelEmbedding":
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, group=group, rank=rank, world_size=world_size)
        with torch.no_grad():
            layer.weight.copy_(split_along_dim(embedding.weight, 0, layer.rank, layer.world_size, "num_embeddings"))
        return layer.to(embedding.weight.dtype)

    def forward(self, ids):
        mine = (ids >= self.vocab_start) & (ids < self.vocab_end)
        local = torch.where(mine, ids - self.vocab_start, torch.zeros_like(ids))
        rows = F.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return reduce_from_tensor_model_parallel_region(rows, self.group)


def parallel_argmax(local_logits: torch.Tensor, group=None) -> torch.Tensor:
    """Part of exercise 2.5 — greedy token choice from vocabulary-parallel logits without gathering them.

    local_logits: [..., V / world_size], this rank's slice of the vocabulary (a ColumnParallelLinear LM
    head with gather_output=False). Returns the global argmax ids [...] (int64), equal on every rank and to
    torch.argmax of the full logits (ties: the lowest id). One all-gather of 2 numbers per position
    instead of V / world_size."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    value, index = local_logits.max(dim=-1)
    index = index + rank * local_logits.shape[-1]
    if world_size == 1:
        return index
    pair = torch.stack([value.double(), index.double()], dim=-1)
    pairs = [torch.empty_like(pair) for _ in range(world_size)]
    dist.all_gather(pairs, pair, group=group)
    values = torch.stack([p[..., 0] for p in pairs], dim=-1)     # [..., world_size]
    indices = torch.stack([p[..., 1] for p in pairs], dim=-1)
    best = values.argmax(dim=-1, keepdim=True)                    # first maximum: lowest rank, lowest id
    return indices.gather(-1, best).squeeze(-1).long()
