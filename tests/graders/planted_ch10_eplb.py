"""Wrong answers to exercise 10.5 (EPLB placement, labs/eplb.py), planted in the reference, for
tests/graders/test_ch10_eplb.py::test_planted_mistakes_are_caught; and valid answers written differently, for
test_valid_alternatives_pass. Records are tests/graders/planted.py's `Mistake`: `check` names the grader's check
(test_ch10_eplb.CHECKS) that must catch it; `points_at` the regexes one of which the line the learner reads must
match.

Several balance a skewed load well enough on a glance (round-robin packing, copies weighed by their expert's whole
load): only a grader that compares with the rule on tie-free inputs catches them. `build(name)` returns an object
with the three functions that the checks accept in place of load_impl("eplb").
"""
from __future__ import annotations

import heapq
import types

import torch

from tests.graders.planted import Mistake

MISTAKES = [
    Mistake("10.5", "replicate_by_raw_load", "each spare slot to the expert of highest load, not load per copy",
            (r"load PER COPY",), check="replicate"),
    Mistake("10.5", "pack_lightest_first", "items packed lightest first", (r"HEAVIEST first",), check="packing"),
    Mistake("10.5", "pack_no_room_limit", "a full pack can still be the lightest", (r"exactly n/num_packs",),
            check="packing"),
    Mistake("10.5", "pack_round_robin", "sorted items dealt to the packs in turn", (r"HEAVIEST first",
                                                                                    r"least total weight"),
            check="packing"),
    Mistake("10.5", "rank_in_pack_global", "rank_in_pack counts all items, not each pack's", (r"in THAT pack",),
            check="packing"),
    Mistake("10.5", "copies_weigh_whole_load", "copies packed with their expert's whole load",
            (r"load\[e\] / counts\[e\]",), check="rebalance"),
    Mistake("10.5", "slots_not_placed", "replicate_experts' order returned, the packing unused",
            (r"still in replicate_experts' order",), check="rebalance"),
]

ALTERNATIVES = [
    Mistake("10.5", "alt_heap_and_torch", "a heap of (weight, pack) for the packing, torch.argsort(stable) for the "
            "order, counts kept in a dict", (), check="replicate+packing+rebalance"),
]


def build(name: str | None):
    """The reference with `name` planted (None: unmodified)."""
    import solutions.eplb as sol
    impl = types.SimpleNamespace(replicate_experts=sol.replicate_experts, balanced_packing=sol.balanced_packing,
                                 rebalance_experts=sol.rebalance_experts)
    if name is not None:
        _PLANT[name](sol, impl)
    return impl


def _rebalance_with(replicate, pack, weigh_by_copy=True, place=True):
    def rebalance_experts(load, num_physical, num_ranks):
        if num_physical % num_ranks:
            raise ValueError("P not divisible by R")
        phy2log, counts = replicate(load, num_physical)
        load = torch.as_tensor(load, dtype=torch.float64)
        weight = (load / counts)[phy2log] if weigh_by_copy else load[phy2log]
        pack_index, rank_in_pack = pack(weight, num_ranks)
        if not place:
            return phy2log
        placed = torch.empty(num_physical, dtype=torch.long)
        placed[pack_index * (num_physical // num_ranks) + rank_in_pack] = phy2log
        return placed
    return rebalance_experts


def _replicate_raw(load, num_physical):
    load = torch.as_tensor(load, dtype=torch.float64)
    if num_physical < len(load):
        raise ValueError("too few slots")
    phy2log, counts = torch.arange(num_physical), torch.ones(len(load), dtype=torch.long)
    for slot in range(len(load), num_physical):
        hottest = int(torch.argmax(load))
        phy2log[slot] = hottest
        counts[hottest] += 1
    return phy2log, counts


def _packer(order="heavy", room=True, round_robin=False, global_rank=False):
    def balanced_packing(weight, num_packs):
        weight = torch.as_tensor(weight, dtype=torch.float64)
        n = len(weight)
        if n % num_packs:
            raise ValueError("n not divisible")
        per = n // num_packs
        items = torch.argsort(weight, descending=(order == "heavy"), stable=True).tolist()
        pack_index, rank_in_pack = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
        totals, sizes = [0.0] * num_packs, [0] * num_packs
        for arrival, item in enumerate(items):
            if round_robin:
                pack = arrival % num_packs
            else:
                pack = min((p for p in range(num_packs) if not room or sizes[p] < per), key=lambda p: (totals[p], p))
            pack_index[item] = pack
            rank_in_pack[item] = arrival if global_rank else sizes[pack]
            totals[pack] += float(weight[item])
            sizes[pack] += 1
        return pack_index, rank_in_pack
    return balanced_packing


def _alt_replicate(load, num_physical):
    values = [float(x) for x in load]
    if num_physical < len(values):
        raise ValueError(f"num_physical={num_physical} < {len(values)} experts")
    counts = {e: 1 for e in range(len(values))}
    phy2log = list(range(len(values)))
    while len(phy2log) < num_physical:
        hottest = max(counts, key=lambda e: (values[e] / counts[e], -e))
        phy2log.append(hottest)
        counts[hottest] += 1
    return torch.tensor(phy2log), torch.tensor([counts[e] for e in range(len(values))])


def _alt_pack(weight, num_packs):
    weight = torch.as_tensor(weight, dtype=torch.float64)
    n = len(weight)
    if n % num_packs:
        raise ValueError(f"{n} items do not split into {num_packs} packs")
    per = n // num_packs
    heap = [(0.0, p) for p in range(num_packs)]
    sizes = [0] * num_packs
    pack_index, rank_in_pack = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    for item in torch.argsort(-weight, stable=True).tolist():
        total, pack = heapq.heappop(heap)
        pack_index[item], rank_in_pack[item] = pack, sizes[pack]
        sizes[pack] += 1
        if sizes[pack] < per:
            heapq.heappush(heap, (total + float(weight[item]), pack))
    return pack_index, rank_in_pack


def _plant_packer(**options):
    def plant(sol, impl):
        impl.balanced_packing = _packer(**options)
    return plant


def _plant_rebalance(**options):
    def plant(sol, impl):
        impl.rebalance_experts = _rebalance_with(sol.replicate_experts, sol.balanced_packing, **options)
    return plant


def _alt(sol, impl):
    impl.replicate_experts, impl.balanced_packing = _alt_replicate, _alt_pack
    impl.rebalance_experts = _rebalance_with(_alt_replicate, _alt_pack)


_PLANT = {
    "replicate_by_raw_load": lambda sol, impl: setattr(impl, "replicate_experts", _replicate_raw),
    "pack_lightest_first": _plant_packer(order="light"),
    "pack_no_room_limit": _plant_packer(room=False),
    "pack_round_robin": _plant_packer(round_robin=True),
    "rank_in_pack_global": _plant_packer(global_rank=True),
    "copies_weigh_whole_load": _plant_rebalance(weigh_by_copy=False),
    "slots_not_placed": _plant_rebalance(place=False),
    "alt_heap_and_torch": _alt,
}
