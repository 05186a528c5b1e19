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
           "tokens_per_expert", "load_imbalance", "skew_towards", "ExpertDeviceTime", "TensorParallelMoE",
           "AllGatherReduceScatterMoE", "PerRankAllToAllMoE", "LowLatencyMoE"]


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
        for full in block.experts:       # in the wrapped block's dtype (float64, bfloat16 blocks too)
            part = Expert(block.hidden, block.ffn // n).to(full.gate_proj.weight.dtype)
            with torch.no_grad():
                part.gate_proj.weight.copy_(full.gate_proj.weight[cols])
                part.up_proj.weight.copy_(full.up_proj.weight[cols])
                part.down_proj.weight.copy_(full.down_proj.weight[:, cols])
            self.experts.append(part)

    def forward(self, x, routing: Routing):
        from helpers.course.tp_regions import reduce_from_tensor_model_parallel_region
        partial = MoEBlock.forward(self, x, routing)     # the same loop, on this rank's slice of every expert
        return reduce_from_tensor_model_parallel_region(partial, self.group)


# ------------------------------------------------------------------------------------------------------------
# Other ways to move the tokens of an expert-parallel layer (chapter 8, section A4): the same experts split over
# the ranks as in exercise 8.2, the same output, different bytes. Each is written after a real system:
#   AllGatherReduceScatterMoE  vLLM's default --all2all-backend "allgather_reducescatter"
#                              (vllm/config/parallel.py all2all_backend; AgRsAll2AllManager in
#                              vllm/distributed/device_communicators/all2all.py: all_gatherv of the hidden states
#                              and top-k ids/weights, reduce_scatterv of the outputs);
#   PerRankAllToAllMoE         DeepEP's normal mode (deep_ep/buffer.py: get_dispatch_layout gives is_token_in_rank,
#                              dispatch sends a token ONCE to each rank holding one of its experts, with its top-k
#                              ids and weights; the received counts come back to the CPU as a Python list);
#   LowLatencyMoE              DeepEP's low-latency mode (deep_ep/buffer.py low_latency_dispatch: receive buffers of
#                              a fixed shape [local experts, max tokens per rank × ranks, hidden], one row per
#                              (token, expert), no count exchange with the CPU, so it can run inside a CUDA graph).
# On gloo, collectives stand in for DeepEP's NVLink/RDMA kernels; the rows they carry are the ones those move.

class _LocalExperts(nn.Module):
    """The router and this rank's experts [r·E/n, (r+1)·E/n) of `block` (the layout of exercise 8.2)."""

    def __init__(self, block: MoEBlock, group=None):
        super().__init__()
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        mine = experts_of_rank(block.num_experts, self.rank, self.world_size)
        self.num_experts, self.first_expert, self.experts_per_rank = block.num_experts, mine.start, len(mine)
        self.router = block.router
        self.experts = nn.ModuleList(block.experts[e] for e in mine)

    def _local_sum(self, rows, expert_ids, weights):
        """Σ over the slots that name one of MY experts of weight · expert(row): rows [R, h], ids/weights [R, k]
        (id -1: no expert)."""
        out = torch.zeros_like(rows)
        for j, expert in enumerate(self.experts):
            row, slot = torch.where(expert_ids == self.first_expert + j)
            if row.numel():
                out.index_add_(0, row, expert(rows[row]) * weights[row, slot, None].to(rows.dtype))
        return out


class AllGatherReduceScatterMoE(_LocalExperts):
    """vLLM's default EP dispatch: every rank all-gathers every rank's tokens and their top-k ids and weights,
    computes its experts' share of EVERY token, and a reduce-scatter sums the shares and hands each rank back
    its own tokens' rows. Bytes do not depend on the routing (the same as a tensor-parallel all-reduce), no
    counts need to travel; ranks with different numbers of tokens are padded here (vLLM's all_gatherv is not)."""

    def forward(self, x, routing: Routing):
        n = self.world_size
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(n)]
        dist.all_gather(sizes, torch.tensor([x.shape[0]]), group=self.group)
        most = int(max(s.item() for s in sizes))
        ids = torch.where(routing.kept, routing.expert_ids, -1)
        packed = torch.cat([x, ids.to(x.dtype), routing.weights.to(x.dtype)], dim=1)   # hidden + k + k columns
        packed = torch.cat([packed, packed.new_zeros(most - x.shape[0], packed.shape[1])])
        gathered = [torch.empty_like(packed) for _ in range(n)]
        dist.all_gather(gathered, packed, group=self.group)
        every = torch.cat(gathered)
        h, k = x.shape[1], ids.shape[1]
        shares = self._local_sum(every[:, :h], every[:, h:h + k].long(), every[:, h + k:])
        mine = torch.empty(most, h, dtype=x.dtype)
        dist.reduce_scatter(mine, list(shares.chunk(n)), group=self.group)
        return mine[:x.shape[0]]


class PerRankAllToAllMoE(_LocalExperts):
    """DeepEP's normal mode: a token goes ONCE to each rank that holds at least one of its kept experts (not
    once per expert), with its top-k ids and weights; that rank sums its experts' weighted outputs for the
    token and sends back one row. Counts per rank travel first (DeepEP returns them to the CPU)."""

    def forward(self, x, routing: Routing):
        n, per = self.world_size, self.experts_per_rank
        ids = torch.where(routing.kept, routing.expert_ids, -1)
        in_rank = torch.zeros(x.shape[0], n, dtype=torch.bool)
        token, slot = torch.where(routing.kept)
        in_rank[token, routing.expert_ids[token, slot] // per] = True                  # is_token_in_rank
        dest, token = torch.where(in_rank.t())                                          # sorted by rank
        send = in_rank.sum(0)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        send, recv = send.tolist(), recv.tolist()
        packed = torch.cat([x[token], ids[token].to(x.dtype), routing.weights[token].to(x.dtype)], dim=1)
        received = packed.new_empty(sum(recv), packed.shape[1])
        dist.all_to_all_single(received, packed, recv, send, group=self.group)
        h, k = x.shape[1], ids.shape[1]
        summed = self._local_sum(received[:, :h], received[:, h:h + k].long(), received[:, h + k:])
        back = x.new_empty(sum(send), h)
        dist.all_to_all_single(back, summed, send, recv, group=self.group)
        return torch.zeros_like(x).index_add_(0, token, back)


class LowLatencyMoE(_LocalExperts):
    """DeepEP's low-latency mode: every (rank, expert) pair owns a FIXED buffer of `max_tokens` rows, whatever
    the routing; a token's row goes once per kept expert into the next free row of that expert's buffer, a flag
    column marks the rows in use, and no count is exchanged first. The combine returns the same fixed buffers,
    and the sender adds each row, weighted, to its token. Raises ValueError when a rank has more than
    max_tokens tokens (DeepEP's num_max_dispatch_tokens_per_rank)."""

    def __init__(self, block: MoEBlock, group=None, max_tokens: int = 64):
        super().__init__(block, group)
        self.max_tokens = max_tokens

    def forward(self, x, routing: Routing):
        if x.shape[0] > self.max_tokens:
            raise ValueError(f"{x.shape[0]} tokens > max_tokens={self.max_tokens}: the buffers have a fixed size")
        n, per, m, h = self.world_size, self.experts_per_rank, self.max_tokens, x.shape[1]
        buffers = x.new_zeros(self.num_experts, m, h + 1)                               # last column: in use
        token, slot = torch.where(routing.kept)
        expert = routing.expert_ids[token, slot]
        order = torch.argsort(expert, stable=True)
        token, slot, expert = token[order], slot[order], expert[order]
        counts = torch.bincount(expert, minlength=self.num_experts)
        row = torch.arange(len(expert)) - (counts.cumsum(0) - counts)[expert]             # place in its buffer
        buffers[expert, row, :h], buffers[expert, row, h] = x[token], 1
        received = torch.empty_like(buffers)                                            # [n × per, m, h + 1]
        dist.all_to_all_single(received, buffers, group=self.group)
        results = x.new_zeros(n * per, m, h)
        for j, module in enumerate(self.experts):
            for source in range(n):
                used = received[source * per + j, :, h] > 0
                if used.any():
                    results[source * per + j, used] = module(received[source * per + j, used, :h])
        back = torch.empty_like(results)
        dist.all_to_all_single(back, results, group=self.group)
        weighted = back[expert, row] * routing.weights[token, slot, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, weighted)
