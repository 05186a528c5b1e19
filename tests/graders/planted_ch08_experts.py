"""Wrong answers to chapter 8's part A exercises, planted in the reference solution, for
tests/graders/test_ch08_experts.py::test_planted_mistakes_are_caught.

Each variant is a realistic mistake; several give the RIGHT output the wrong way (every token to every rank,
padded buffers, dropped slots sent anyway, every expert on every rank), so only a grader that checks the
collectives, the bytes and who computes what catches them. `build(name)` returns an implementation object
(`.expert_parallel`) that the graders' check functions accept in place of load_impl("expert_parallel").
"""
from __future__ import annotations

import copy
import math
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Variant:
    exercise: str
    check: str          # "capacity", "route" (in the test process), "ep", "ep_errors" (in a 4-rank job)
    what: str
    points_at: tuple    # the first failure message must contain one of these


VARIANTS = {
    "capacity_floor": Variant("8.1", "capacity", "floor instead of ceil", ("round UP",)),
    "capacity_ceil_twice": Variant("8.1", "capacity", "ceil(factor·ceil(T·k/E)): rounded up twice",
                                   ("round once, at the end",)),
    "capacity_per_choice": Variant("8.1", "capacity", "ceil(factor·T/E)·k: each choice rounded up",
                                   ("multiply by top_k BEFORE rounding",)),
    "capacity_truncated": Variant("8.1", "capacity", "ceil of int(factor·T·k)/E: the product truncated first",
                                  ("truncate factor·T·k",)),
    "route_no_renorm": Variant("8.1", "route", "top-k probabilities not renormalised", ("renormalise the top-k",)),
    "route_low_precision": Variant("8.1", "route", "softmax in bfloat16", ("float32",)),
    "route_token_major": Variant("8.1", "route", "capacity served token by token", ("first choices",)),
    "route_dropped_weight": Variant("8.1", "route", "a dropped slot keeps its weight", ("weight 0",)),
    "route_renorm_dropped": Variant("8.1", "route", "kept weights renormalised after dropping",
                                    ("NOT be renormalised",)),
    "route_no_errors": Variant("8.1", "route", "top_k > num_experts accepted", ("ValueError",)),
    "ep_all_gather": Variant("8.2", "ep", "all tokens all-gathered, outputs all-reduced", ("only all_to_all",)),
    "ep_padded": Variant("8.2", "ep", "payloads padded to the largest count", ("no padding",)),
    "ep_sends_dropped": Variant("8.2", "ep", "dropped slots sent and computed with weight 0", ("dropped slots",)),
    "ep_order_lost": Variant("8.2", "ep", "results added back in expert order", ("original order",)),
    "ep_all_experts": Variant("8.2", "ep", "every expert on every rank", ("its experts",)),
    "ep_unweighted": Variant("8.2", "ep", "results not multiplied by the gate weights", ("gate weight",)),
    "ep_duplicates_lost": Variant("8.2", "ep", "out[token] += rows: a token's repeated index keeps one of its slots",
                                  ("only one of its",)),
    "ep_per_rank_slot_lost": Variant("8.2", "ep", "one row per destination rank, but its local experts' results "
                                     "assigned, not added: a token with two experts on one rank keeps one",
                                     ("only one of its",)),
    "ep_weights_early": Variant("8.2", "ep", "x's rows scaled by the gate weights before the experts",
                                ("AFTER the expert",)),
    "ep_weighted_twice": Variant("8.2", "ep", "gate weights applied before the experts and again after",
                                 ("once, after the expert",)),
    "ep_floor_split": Variant("8.2", "ep_errors", "num_experts // world_size, no ValueError", ("ValueError",)),
}


# Valid answers written differently: the graders must pass them (test_valid_alternatives_pass).
ALTERNATIVES = {
    "route_softmax_of_top_k": "gate weights as a softmax over the top-k logits (equal to renormalised probabilities)",
    # (dist.all_to_all on lists needs equal-size tensors on gloo: fine for the counts, not for the rows)
    "ep_list_all_to_all": "the counts exchanged with dist.all_to_all on lists of tensors",
    "ep_counts_all_gather": "the whole count matrix all-gathered, rows with all_to_all_single",
    "ep_per_rank": "DeepEP's normal mode: a token sent once per destination rank with its top-k ids and weights "
                   "packed beside it, its experts' weighted sum sent back once",
}


def build(name: str | None):
    """The reference implementation with variant `name` planted (None: unmodified)."""
    import solutions.expert_parallel as sol
    ep = types.SimpleNamespace(**{k: v for k, v in vars(sol).items() if not k.startswith("__")})
    if name is not None:
        (_PLANT | _ALTERNATIVE)[name](sol, ep)
    return types.SimpleNamespace(expert_parallel=ep)


# ------------------------------------------------------------------------------------------- 8.1

def _capacity(formula):
    """expert_capacity with the reference's checks and another rounding (each agrees with ceil(f·T·k/E) on
    the grader's first five cases: the old grader passed them all but floor)."""
    def expert_capacity(num_tokens, num_experts, top_k, capacity_factor):
        if not capacity_factor > 0:
            raise ValueError("capacity_factor must be > 0")
        return formula(num_tokens, num_experts, top_k, capacity_factor)
    return lambda sol, ep: setattr(ep, "expert_capacity", expert_capacity)


_capacity_floor = _capacity(lambda t, e, k, f: math.floor(f * t * k / e))
_capacity_ceil_twice = _capacity(lambda t, e, k, f: math.ceil(f * math.ceil(t * k / e)))      # Switch-style
_capacity_per_choice = _capacity(lambda t, e, k, f: math.ceil(f * t / e) * k)
_capacity_truncated = _capacity(lambda t, e, k, f: -(-int(f * t * k) // e))                   # integer ceil


def _route(mistake):
    def top_k_route(router_logits, top_k, capacity=None):
        from helpers.course.moe import Routing
        num_tokens, num_experts = router_logits.shape
        if mistake != "no_errors" and not 1 <= top_k <= num_experts:
            raise ValueError("top_k out of range")
        if router_logits.dim() != 2 or (capacity is not None and capacity < 0):
            raise ValueError("bad input")
        probs = F.softmax(router_logits if mistake == "low_precision" else router_logits.float(), dim=-1)
        weights, ids = probs.topk(min(top_k, num_experts), dim=-1)
        weights = weights.float()
        if mistake != "no_renorm":
            weights = weights / weights.sum(-1, keepdim=True)
        kept = torch.ones_like(ids, dtype=torch.bool)
        if capacity is not None:
            order = ids.reshape(-1) if mistake == "token_major" else ids.t().reshape(-1)
            one_hot = F.one_hot(order, num_experts)
            place = ((one_hot.cumsum(0) - 1) * one_hot).sum(-1)
            kept = place < capacity
            kept = kept.reshape(num_tokens, top_k) if mistake == "token_major" else kept.reshape(top_k, num_tokens).t()
            if mistake != "dropped_weight":
                weights = weights * kept
            if mistake == "renorm_dropped":
                weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)
        return Routing(ids, weights, kept)
    return lambda sol, ep: setattr(ep, "top_k_route", top_k_route)


# ------------------------------------------------------------------------------------------- 8.2

def _forward(mistake):
    """The reference forward with one mistake (or one valid alternative) switched on."""
    def forward(self, x, routing):
        n, per_rank, group = self.world_size, self.experts_per_rank, self.group
        kept = torch.ones_like(routing.kept) if mistake == "sends_dropped" else routing.kept
        token, slot = torch.where(kept)
        expert = routing.expert_ids[token, slot]
        order = torch.argsort(expert, stable=True)
        unsorted_token = token.clone()
        token, slot, expert = token[order], slot[order], expert[order]
        send_counts = torch.bincount(expert, minlength=self.num_experts)
        recv_counts = torch.empty_like(send_counts)
        if mistake == "list_all_to_all":
            parts = [torch.empty(per_rank, dtype=torch.long) for _ in range(n)]
            dist.all_to_all(parts, list(send_counts.split(per_rank)), group=group)
            recv_counts = torch.cat(parts)
        elif mistake == "counts_all_gather":
            matrix = [torch.empty_like(send_counts) for _ in range(n)]
            dist.all_gather(matrix, send_counts, group=group)
            rank = dist.get_rank(group)
            recv_counts = torch.cat([m[rank * per_rank:(rank + 1) * per_rank] for m in matrix])
        else:
            dist.all_to_all_single(recv_counts, send_counts, group=group)
        send_splits = send_counts.view(n, per_rank).sum(1).tolist()
        recv_splits = recv_counts.view(n, per_rank).sum(1).tolist()
        weights = routing.weights[token, slot, None].to(x.dtype)
        rows = x[token] * weights if mistake in ("weights_early", "weighted_twice") else x[token]
        if mistake == "padded":                         # fixed-size buffers: every chunk as large as the largest
            largest = torch.zeros(1, dtype=torch.long) + max(send_splits)
            gathered = [torch.zeros_like(largest) for _ in range(n)]
            dist.all_gather(gathered, largest, group=group)
            pad = int(max(g.item() for g in gathered))
            chunks = list(rows.split(send_splits))
            padded = torch.cat([torch.cat([c, c.new_zeros(pad - c.shape[0], c.shape[1])]) for c in chunks])
            got = x.new_empty(n * pad, x.shape[1])
            dist.all_to_all_single(got, padded, group=group)
            received = torch.cat([got[s * pad:s * pad + recv_splits[s]] for s in range(n)])
        else:
            received = x.new_empty(sum(recv_splits), x.shape[1])
            dist.all_to_all_single(received, rows.contiguous(), recv_splits, send_splits, group=group)
        local_expert = torch.arange(per_rank).repeat(n).repeat_interleave(recv_counts)
        results = torch.empty_like(received)
        for j in range(per_rank):
            module = self.experts[self.first_expert + j] if mistake == "all_experts" else self.experts[j]
            where = torch.where(local_expert == j)[0]
            if where.numel():
                results[where] = module(received[where])
        returned = x.new_empty(sum(send_splits), x.shape[1])
        dist.all_to_all_single(returned, results, send_splits, recv_splits, group=group)
        if mistake in ("unweighted", "weights_early"):
            weights = torch.ones_like(weights)
        if mistake == "order_lost":
            token, weights = unsorted_token, routing.weights[unsorted_token, slot, None].to(x.dtype)
        out = torch.zeros_like(x)
        if mistake == "duplicates_lost":                # a repeated index keeps one write: the other slot is lost
            out[token] += returned * weights
        else:
            out.index_add_(0, token, returned * weights)
        return out
    return forward


def _ep_forward(mistake):
    def plant(sol, ep):
        ep.ExpertParallelMoE = type("ExpertParallelMoE", (sol.ExpertParallelMoE,), {"forward": _forward(mistake)})
    return plant


def _ep_all_gather(sol, ep):
    class AllGather(sol.ExpertParallelMoE):
        def forward(self, x, routing):
            n, group = self.world_size, self.group
            sizes = [torch.zeros(1, dtype=torch.long) for _ in range(n)]
            dist.all_gather(sizes, torch.tensor([x.shape[0]]), group=group)
            largest = int(max(s.item() for s in sizes))
            def gather(t):
                padded = torch.cat([t, t.new_zeros(largest - t.shape[0], *t.shape[1:])])
                parts = [torch.empty_like(padded) for _ in range(n)]
                dist.all_gather(parts, padded.contiguous(), group=group)
                return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])
            all_x, ids, w, kept = gather(x), gather(routing.expert_ids), gather(routing.weights), gather(routing.kept)
            out = torch.zeros_like(all_x)
            for j, module in enumerate(self.experts):
                token, slot = torch.where((ids == self.first_expert + j) & kept)
                if token.numel():
                    out.index_add_(0, token, module(all_x[token]) * w[token, slot, None])
            dist.all_reduce(out, group=group)
            start = sum(int(s.item()) for s in sizes[:self.rank])
            return out[start:start + x.shape[0]]
    ep.ExpertParallelMoE = AllGather


def _ep_all_experts(sol, ep):
    # A learner who kept `self.all_experts = block.experts` beside the slice (to look experts up by global id).
    class AllExpertsKept(sol.ExpertParallelMoE):
        def __init__(self, block, group=None):
            super().__init__(block, group)
            self.all_experts = copy.deepcopy(block.experts)
    ep.ExpertParallelMoE = AllExpertsKept


def _ep_floor_split(sol, ep):
    class Floor(sol.ExpertParallelMoE):
        def __init__(self, block, group=None):
            nn.Module.__init__(self)
            self.group = group
            self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
            self.num_experts, self.hidden = block.num_experts, block.hidden
            self.experts_per_rank = block.num_experts // self.world_size
            self.first_expert = self.rank * self.experts_per_rank
            self.router = copy.deepcopy(block.router)
            self.experts = nn.ModuleList(copy.deepcopy(block.experts[self.first_expert + j])
                                         for j in range(self.experts_per_rank))
    ep.ExpertParallelMoE = Floor


_PLANT = {
    "capacity_floor": _capacity_floor,
    "capacity_ceil_twice": _capacity_ceil_twice,
    "capacity_per_choice": _capacity_per_choice,
    "capacity_truncated": _capacity_truncated,
    "route_no_renorm": _route("no_renorm"),
    "route_low_precision": _route("low_precision"),
    "route_token_major": _route("token_major"),
    "route_dropped_weight": _route("dropped_weight"),
    "route_renorm_dropped": _route("renorm_dropped"),
    "route_no_errors": _route("no_errors"),
    "ep_all_gather": _ep_all_gather,
    "ep_padded": _ep_forward("padded"),
    "ep_sends_dropped": _ep_forward("sends_dropped"),
    "ep_order_lost": _ep_forward("order_lost"),
    "ep_all_experts": _ep_all_experts,
    "ep_unweighted": _ep_forward("unweighted"),
    "ep_duplicates_lost": _ep_forward("duplicates_lost"),
    "ep_weights_early": _ep_forward("weights_early"),
    "ep_weighted_twice": _ep_forward("weighted_twice"),
    "ep_floor_split": _ep_floor_split,
}


def _route_softmax_of_top_k(sol, ep):
    def top_k_route(router_logits, top_k, capacity=None):
        from helpers.course.moe import Routing
        reference = sol.top_k_route(router_logits, top_k, capacity)
        top_logits = router_logits.float().gather(-1, reference.expert_ids)
        weights = F.softmax(top_logits, dim=-1) * reference.kept
        return Routing(reference.expert_ids, weights, reference.kept)
    ep.top_k_route = top_k_route


def _ep_per_rank(sol, ep):
    from helpers.course.moe import PerRankAllToAllMoE, _LocalExperts

    class PerRank(sol.ExpertParallelMoE):
        _local_sum = _LocalExperts._local_sum
        forward = PerRankAllToAllMoE.forward
    ep.ExpertParallelMoE = PerRank


def _ep_per_rank_slot_lost(sol, ep):
    from helpers.course.moe import PerRankAllToAllMoE

    def local_sum(self, rows, expert_ids, weights):
        out = torch.zeros_like(rows)
        for j, expert in enumerate(self.experts):
            row, slot = torch.where(expert_ids == self.first_expert + j)
            if row.numel():                 # = instead of +=: the token's previous local expert is overwritten
                out[row] = expert(rows[row]) * weights[row, slot, None].to(rows.dtype)
        return out

    class PerRank(sol.ExpertParallelMoE):
        _local_sum = local_sum
        forward = PerRankAllToAllMoE.forward
    ep.ExpertParallelMoE = PerRank


_PLANT["ep_per_rank_slot_lost"] = _ep_per_rank_slot_lost

_ALTERNATIVE = {
    "route_softmax_of_top_k": _route_softmax_of_top_k,
    "ep_per_rank": _ep_per_rank,
    "ep_list_all_to_all": _ep_forward("list_all_to_all"),
    "ep_counts_all_gather": _ep_forward("counts_all_gather"),
}
