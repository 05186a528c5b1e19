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
    raise NotImplementedError("Exercise 6.1: check_plan is not written yet (labs/capstone/plan.py)")


def replica_ranks(plan: Plan) -> list[list[list[int]]]:
    """Exercise 6.1b — the global ranks of each replica, stage by stage:
    result[d][s] = the tp ranks of pipeline stage s of replica d.

    Layout dp-major, then pp, then tp (the order of `init_device_mesh(..., (dp, pp, tp),
    mesh_dim_names=("dp", "pp", "tp"))`): rank = d * pp * tp + s * tp + t. Adjacent ranks share a
    tensor-parallel group, because its all-reduces are the most frequent traffic.
    Plan(dp=2, pp=1, tp=2) -> [[[0, 1]], [[2, 3]]].
    """
    raise NotImplementedError("Exercise 6.1: replica_ranks is not written yet (labs/capstone/plan.py)")
