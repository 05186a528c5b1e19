"""Chapter 8 given code: a small mixture-of-experts (MoE) block, its routing record, and the pieces around
expert parallelism that are not the exercise (a transformers Mixtral block to check against, a tensor-parallel
MoE to compare bytes with, modelled device time per expert, routing histograms).

    block = MoEBlock(hidden=32, ffn=64, num_experts=8, top_k=2)
    logits = block.router(x)                              # x: [tokens, hidden] -> [tokens, num_experts]
    routing = ep.top_k_route(logits, block.top_k)         # exercise 8.1: which experts, which weights, kept?
    y = block(x, routing)                                 # [tokens, hidden]: Σ_k weight_k · expert_k(x)

The block follows Mixtral (transformers' MixtralSparseMoeBlock): a linear router without bias, softmax over
all experts, the top-k probabilities renormalised to sum to 1, experts that are SwiGLU MLPs
(down(silu(gate(x)) · up(x))). A slot that the capacity limit dropped contributes nothing: the token keeps
what the residual connection around the block carries.
"""
from __future__ import annotations

import math
import time
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Routing", "Expert", "MoEBlock", "from_mixtral", "tiny_mixtral_block", "experts_of_rank",
           "tokens_per_expert", "load_imbalance", "skew_towards", "ExpertDeviceTime", "TensorParallelMoE"]


class Routing(NamedTuple):
    """Where each token goes. T tokens, k = top_k.

    expert_ids: [T, k] int64, the experts chosen for each token, highest probability first
    weights:    [T, k] float, the gate weights (0 where the slot was dropped)
    kept:       [T, k] bool, False where the expert's capacity was full and the slot was dropped
    """
    expert_ids: torch.Tensor
    weights: torch.Tensor
    kept: torch.Tensor


class Expert(nn.Module):
    """One expert: a SwiGLU MLP hidden -> ffn -> hidden, no biases (as Mixtral, Qwen-MoE, DeepSeek)."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):                       # x: [rows, hidden]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEBlock(nn.Module):
    """The single-process MoE block: a router and `num_experts` experts, each token sent to `top_k` of them."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int = 2):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.hidden, self.ffn, self.num_experts, self.top_k = hidden, ffn, num_experts, top_k
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, ffn) for _ in range(num_experts))

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x: [T, hidden], routing for those T tokens -> [T, hidden]. Each expert runs once, on its rows."""
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where((routing.expert_ids == e) & routing.kept)
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * routing.weights[token, slot, None].to(x.dtype))
        return out


def from_mixtral(hf_block) -> MoEBlock:
    """Our MoEBlock with the weights of a transformers MixtralSparseMoeBlock (router `gate.weight` [E, H],
    experts stored as 3-D tensors: gate_up_proj [E, 2·ffn, H] with the gate rows first, down_proj [E, H, ffn])."""
    experts = hf_block.experts
    num_experts, hidden, ffn = experts.num_experts, experts.hidden_dim, experts.intermediate_dim
    block = MoEBlock(hidden, ffn, num_experts, hf_block.top_k)
    with torch.no_grad():
        block.router.weight.copy_(hf_block.gate.weight)
        for e, expert in enumerate(block.experts):
            gate, up = experts.gate_up_proj[e].chunk(2, dim=0)
            expert.gate_proj.weight.copy_(gate)
            expert.up_proj.weight.copy_(up)
            expert.down_proj.weight.copy_(experts.down_proj[e])
    return block


def tiny_mixtral_block(hidden: int = 32, ffn: int = 64, num_experts: int = 8, top_k: int = 2, seed: int = 0):
    """A transformers MixtralSparseMoeBlock built from a tiny MixtralConfig (no download), weights from `seed`."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    config = MixtralConfig(hidden_size=hidden, intermediate_size=ffn, num_local_experts=num_experts,
                           num_experts_per_tok=top_k, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=64)
    config._experts_implementation = "eager"   # a standalone block: no model to pick a kernel for it
    torch.manual_seed(seed)
    block = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            nn.init.normal_(p, std=hidden ** -0.5)
    return block


def experts_of_rank(num_experts: int, rank: int, world_size: int) -> range:
    """The experts rank `rank` holds under expert parallelism: a contiguous block of num_experts/world_size."""
    if num_experts % world_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by world_size={world_size}: every rank must "
                         f"hold the same number of experts")
    per_rank = num_experts // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


def tokens_per_expert(routing: Routing, num_experts: int) -> torch.Tensor:
    """[num_experts] int64: how many kept slots each expert receives (the routing histogram)."""
    return torch.bincount(routing.expert_ids[routing.kept], minlength=num_experts)


def load_imbalance(counts: torch.Tensor) -> float:
    """max / mean of a load vector: 1.0 is perfectly balanced; the slowest expert (or rank) sets the pace."""
    counts = counts.double()
    return float(counts.max() / counts.mean()) if counts.sum() > 0 else 1.0


def skew_towards(x: torch.Tensor, block: MoEBlock, expert: int = 0, logit_boost: float = 2.0) -> torch.Tensor:
    """x shifted along router row `expert` so that every token's logit for that expert rises by `logit_boost`
    (x + boost · w_e / |w_e|²): a batch of similar requests (all code, all one language) that the router sends
    to the same expert. The other experts' logits move only by the small overlap of their rows with w_e."""
    w = block.router.weight[expert].detach()
    return x + logit_boost * w / w.dot(w)


class ExpertDeviceTime:
    """Modelled device time: every call of a wrapped expert takes `ms_per_row` × rows + `ms_per_call` of wall
    time (a sleep after the real work, as the host waits for its accelerator). Four ranks on two busy cores
    stretch real matmuls unevenly; a fixed cost per row does not, so the slowest rank is the one with most rows.

        timer = ExpertDeviceTime(ms_per_row=0.2)
        timer.wrap(local_experts)         # an nn.ModuleList of experts (or any modules called on [rows, hidden])
        ... forward ...
        timer.rows, timer.seconds         # rows this rank's experts computed, and the wall time they took
    """

    def __init__(self, ms_per_row: float, ms_per_call: float = 0.0):
        self.ms_per_row, self.ms_per_call = ms_per_row, ms_per_call
        self.rows, self.seconds = 0, 0.0

    def wrap(self, experts):
        for expert in experts:
            inner = expert.forward

            def timed(x, inner=inner):
                start = time.perf_counter()
                out = inner(x)
                cost = (self.ms_per_call + self.ms_per_row * x.shape[0]) / 1e3
                left = cost - (time.perf_counter() - start)
                if left > 0:
                    time.sleep(left)
                self.rows += x.shape[0]
                self.seconds += time.perf_counter() - start
                return out
            expert.forward = timed
        return experts


class TensorParallelMoE(nn.Module):
    """The same MoE block with TENSOR parallelism, to compare bytes with expert parallelism: every rank holds
    every expert's gate/up columns [r·ffn/n, (r+1)·ffn/n) and the matching down rows, sees ALL tokens (the
    attention before it is tensor-parallel too, so every rank has the same activations), and the partial
    outputs are summed by one all-reduce per layer (reduce_from_tensor_model_parallel_region)."""

    def __init__(self, block: MoEBlock, group=None):
        super().__init__()
        from helpers.course.tp_regions import group_rank_and_size
        self.group = group
        rank, n = group_rank_and_size(group=group)
        if block.ffn % n:
            raise ValueError(f"ffn={block.ffn} is not divisible by world_size={n}")
        cols = slice(rank * block.ffn // n, (rank + 1) * block.ffn // n)
        self.router = block.router
        self.experts = nn.ModuleList()
        for full in block.experts:
            part = Expert(block.hidden, block.ffn // n)
            with torch.no_grad():
                part.gate_proj.weight.copy_(full.gate_proj.weight[cols])
                part.up_proj.weight.copy_(full.up_proj.weight[cols])
                part.down_proj.weight.copy_(full.down_proj.weight[:, cols])
            self.experts.append(part)

    def forward(self, x, routing: Routing):
        from helpers.course.tp_regions import reduce_from_tensor_model_parallel_region
        partial = MoEBlock.forward(self, x, routing)     # the same loop, on this rank's slice of every expert
        return reduce_from_tensor_model_parallel_region(partial, self.group)
