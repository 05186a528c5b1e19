"""Capstone, exercise 6.1 — a parallel plan for serving."""
from __future__ import annotations

from helpers.course.parallel_plan import Plan  # given: Plan(dp, pp, tp) and its world_size


def check_plan(plan: Plan, config) -> Plan:
    """Exercise 6.1a — return `plan` if the model described by `config` (a transformers LlamaConfig) can be
    served with it, else raise ValueError saying which size does not fit and what would.

    Rules: dp, pp, tp are whole numbers >= 1 (bool is not a number here). tp must divide
    num_attention_heads, intermediate_size and vocab_size, and either divide num_key_value_heads or be a
    multiple of it (chapter 2's head-parallel attention). pp must divide num_hidden_layers.
    """
    for name in ("dp", "pp", "tp"):
        v = getattr(plan, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r}: every degree of a plan is a whole number >= 1")
    tp, pp = plan.tp, plan.pp
    for field in ("num_attention_heads", "intermediate_size", "vocab_size"):
        size = getattr(config, field)
        if size % tp:
            raise ValueError(f"tp={tp} does not divide {field}={size}: choose tp among "
                             f"{[d for d in range(1, size + 1) if size % d == 0 and d <= 8]}")
    kv = config.num_key_value_heads
    if kv % tp and tp % kv:
        raise ValueError(f"tp={tp} neither divides nor is a multiple of num_key_value_heads={kv}")
    layers = config.num_hidden_layers
    if layers % pp:
        raise ValueError(f"pp={pp} does not divide num_hidden_layers={layers}: each stage needs as many layers")
    return plan


def replica_ranks(plan: Plan) -> list[list[list[int]]]:
    """Exercise 6.1b — the global ranks of each replica, stage by stage:
    result[d][s] = the tp ranks of pipeline stage s of replica d.

    Layout dp-major, then pp, then tp (the order of `init_device_mesh(..., (dp, pp, tp),
    mesh_dim_names=("dp", "pp", "tp"))`): rank = d * pp * tp + s * tp + t. Adjacent ranks share a
    tensor-parallel group, because its all-reduces are the most frequent traffic.
    Plan(dp=2, pp=1, tp=2) -> [[[0, 1]], [[2, 3]]].
    """
    return [[[d * plan.pp * plan.tp + s * plan.tp + t for t in range(plan.tp)] for s in range(plan.pp)]
            for d in range(plan.dp)]
