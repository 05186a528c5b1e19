"""Chapter 10: where to put redundant experts (EPLB).

Exercise 10.5  vLLM's expert-parallel load balancer (vllm/distributed/eplb/policy/default.py, DefaultEplbPolicy,
               adapted from DeepSeek's EPLB), for one MoE layer on one node: given the tokens each LOGICAL expert
               received, choose which expert each of the P PHYSICAL slots holds (P > E: the spare slots hold
               copies of hot experts) and put the slots on R ranks so that the busiest rank has as little work
               as it can. Two greedy steps and the function that joins them:

    replicate_experts(load, P)         which experts get the spare slots: one at a time, to the expert with the
                                       highest load PER COPY so far
    balanced_packing(weight, R)        which rank each copy goes to: heaviest first, to the lightest rank with
                                       a free slot
    rebalance_experts(load, P, R)      both; returns phy2log [P]: slot s (on rank s // (P/R)) holds a copy of
                                       logical expert phy2log[s]

The rest (routing tokens among copies with vLLM's hash, the layer on real EP ranks, vLLM's own function to compare
with) is given in helpers/course/eplb.py.
"""
from __future__ import annotations

import numpy as np
import torch

# ------------------------------------------------------------------------------------ 10.5 EPLB placement


def replicate_experts(load, num_physical: int) -> tuple[torch.Tensor, torch.Tensor]:
    """load: [E] tokens per logical expert (a tensor or list). Returns (phy2log [P] int64, counts [E] int64):
    slots 0..E-1 hold experts 0..E-1; each further slot holds a copy of the expert whose load / copies is the
    highest at that moment (the first such expert on ties), and that expert's count grows by one. The greedy
    minimises the largest load per copy. Raises ValueError when num_physical < E."""
    load = torch.as_tensor(load, dtype=torch.float64)
    num_logical = load.shape[0]
    if num_physical < num_logical:
        raise ValueError(f"num_physical={num_physical} < {num_logical} experts: every expert needs a slot")
    phy2log = torch.arange(num_physical, dtype=torch.long)
    counts = torch.ones(num_logical, dtype=torch.long)
    for slot in range(num_logical, num_physical):
        hottest = int(torch.argmax(load / counts))
        phy2log[slot] = hottest
        counts[hottest] += 1
    return phy2log, counts


def balanced_packing(weight, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight: [n] (a tensor or list). Returns (pack_index [n], rank_in_pack [n]) int64: items in order of
    decreasing weight (any order among equal weights), each to the pack of least total weight that still has
    room (the first such pack on ties); every pack takes exactly n / num_packs items, and rank_in_pack counts an
    item's place in its pack in the order items arrived (0, 1, ...). Raises ValueError when n is not divisible
    by num_packs."""
    weight = np.asarray(torch.as_tensor(weight, dtype=torch.float64))
    n = weight.shape[0]
    if n % num_packs:
        raise ValueError(f"{n} items do not split into {num_packs} equal packs")
    per_pack = n // num_packs
    pack_index, rank_in_pack = torch.full((n,), -1, dtype=torch.long), torch.full((n,), -1, dtype=torch.long)
    pack_weight, pack_items = np.zeros(num_packs), np.zeros(num_packs, dtype=np.int64)
    for item in np.argsort(-weight[None, :], axis=-1)[0]:       # vLLM's sort (numpy's order among ties)
        pack = int(np.argmin(pack_weight))
        pack_index[item], rank_in_pack[item] = pack, int(pack_items[pack])
        pack_weight[pack] += weight[item]
        pack_items[pack] += 1
        if pack_items[pack] == per_pack:
            pack_weight[pack] = np.inf                            # full: never the lightest again
    return pack_index, rank_in_pack


def rebalance_experts(load, num_physical: int, num_ranks: int) -> torch.Tensor:
    """load: [E] tokens per logical expert. Returns phy2log [P] int64: replicate_experts gives the copies; each
    copy weighs load[e] / counts[e]; balanced_packing puts the copies on num_ranks ranks; the copy packed at
    (rank, place) goes to slot rank · (P/R) + place. Raises ValueError when P is not divisible by num_ranks."""
    if num_physical % num_ranks:
        raise ValueError(f"num_physical={num_physical} is not divisible by num_ranks={num_ranks}")
    phy2log, counts = replicate_experts(load, num_physical)
    per_copy = (torch.as_tensor(load, dtype=torch.float64) / counts)[phy2log]
    pack_index, rank_in_pack = balanced_packing(per_copy, num_ranks)
    slot = pack_index * (num_physical // num_ranks) + rank_in_pack
    placed = torch.empty(num_physical, dtype=torch.long)
    placed[slot] = phy2log
    return placed
