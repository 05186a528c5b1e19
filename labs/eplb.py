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
    raise NotImplementedError("Exercise 10.5: replicate_experts is not written yet (labs/eplb.py)")


def balanced_packing(weight, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight: [n] (a tensor or list). Returns (pack_index [n], rank_in_pack [n]) int64: items in order of
    decreasing weight (any order among equal weights), each to the pack of least total weight that still has
    room (the first such pack on ties); every pack takes exactly n / num_packs items, and rank_in_pack counts an
    item's place in its pack in the order items arrived (0, 1, ...). Raises ValueError when n is not divisible
    by num_packs."""
    raise NotImplementedError("Exercise 10.5: balanced_packing is not written yet (labs/eplb.py)")


def rebalance_experts(load, num_physical: int, num_ranks: int) -> torch.Tensor:
    """load: [E] tokens per logical expert. Returns phy2log [P] int64: replicate_experts gives the copies; each
    copy weighs load[e] / counts[e]; balanced_packing puts the copies on num_ranks ranks; the copy packed at
    (rank, place) goes to slot rank · (P/R) + place. Raises ValueError when P is not divisible by num_ranks."""
    raise NotImplementedError("Exercise 10.5: rebalance_experts is not written yet (labs/eplb.py)")
