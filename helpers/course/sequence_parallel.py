"""Sequence parallelism, given code for chapter 8: a norm + MLP block run with tensor parallelism, with or
without Megatron's sequence-parallel region, and a count of the activation bytes autograd keeps.

    plain TP:   x [seq, h] on every rank -> norm -> copy_to -> fc1 (columns) -> GELU -> fc2 (rows)
                -> all-reduce -> + bias + x
    TP + SP:    x [seq/n, h] (my rows)   -> norm -> all-gather (seq) -> fc1 (columns) -> GELU -> fc2 (rows)
                -> reduce-scatter (seq) -> + bias + x

The all-reduce is a reduce-scatter followed by an all-gather: sequence parallelism runs the same two halves
at two different places, so the bytes on the wire are the same, and between them (norm, residual) each
rank holds only its 1/n of the tokens. The operators come from exercise 8.3 (pass `load_impl("sequence_parallel")`).
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers.course.tp_regions import (copy_to_tensor_model_parallel_region, group_rank_and_size,
                                reduce_from_tensor_model_parallel_region, split_along_dim)

__all__ = ["NormMLP", "ParallelNormMLP", "SavedActivations"]


class NormMLP(nn.Module):
    """x + fc2(GELU(fc1(LayerNorm(x)))): a pre-norm transformer feed-forward sub-block. x: [seq, hidden]."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class SavedActivations:
    """Bytes of the activations autograd saves for the backward pass, per region of the forward pass
    (saved_tensors_hooks; parameters and storages already counted are left out).

        saved = SavedActivations(block.parameters())
        with saved.region("norm"):
            h = norm(x)
        saved.bytes   # {"norm": ...}
    """

    def __init__(self, parameters=()):
        self.bytes: dict[str, int] = {}
        self._seen = {p.untyped_storage().data_ptr() for p in parameters}

    @contextlib.contextmanager
    def region(self, name: str):
        self.bytes.setdefault(name, 0)

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self._seen:
                self._seen.add(ptr)
                self.bytes[name] += t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield


class ParallelNormMLP(nn.Module):
    """A NormMLP split over the ranks of `group`: fc1 by columns, fc2 by rows (Megatron's pairing); the norm
    replicated. sequence_parallel=False: x is [seq, h] on every rank and one all-reduce ends the block.
    sequence_parallel=True: x is this rank's [seq/n, h] rows, and `regions` (the module of exercise 8.3)
    gathers before fc1 and reduce-scatters after fc2. `self.saved` counts the saved activations of the
    last forward pass: "norm + residual" (outside the TP matmuls) and "tensor parallel" (inside)."""

    def __init__(self, full: NormMLP, group=None, sequence_parallel: bool = False, regions=None):
        super().__init__()
        if sequence_parallel and regions is None:
            raise ValueError("sequence_parallel=True needs `regions`: pass load_impl('sequence_parallel')")
        rank, world_size = group_rank_and_size(group=group)
        self.group, self.sequence_parallel, self.regions = group, sequence_parallel, regions
        self.norm = copy.deepcopy(full.norm)      # the wrapped block's norm, in its dtype (float64, bfloat16 too)
        self.fc1_weight = nn.Parameter(split_along_dim(full.fc1.weight, 0, rank, world_size, "ffn"))
        self.fc1_bias = nn.Parameter(split_along_dim(full.fc1.bias, 0, rank, world_size, "ffn"))
        self.fc2_weight = nn.Parameter(split_along_dim(full.fc2.weight, 1, rank, world_size, "ffn"))
        self.fc2_bias = nn.Parameter(full.fc2.bias.detach().clone())
        self.saved = SavedActivations()

    def forward(self, x):
        self.saved = SavedActivations(self.parameters())
        with self.saved.region("norm + residual"):
            h = self.norm(x)
        with self.saved.region("tensor parallel"):
            if self.sequence_parallel:
                h = self.regions.gather_from_sequence_parallel_region(h, self.group)
            else:
                h = copy_to_tensor_model_parallel_region(h, self.group)
            partial = F.gelu(F.linear(h, self.fc1_weight, self.fc1_bias)) @ self.fc2_weight.t()
            if self.sequence_parallel:
                y = self.regions.reduce_scatter_to_sequence_parallel_region(partial, self.group)
            else:
                y = reduce_from_tensor_model_parallel_region(partial, self.group)
        with self.saved.region("norm + residual"):
            return x + (y + self.fc2_bias)
