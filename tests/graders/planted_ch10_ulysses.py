"""Wrong answers to exercise 10.4 (Ulysses, labs/ulysses.py), planted in the reference, for
tests/graders/test_ch10_ulysses.py::test_planted_mistakes_are_caught; and valid answers written differently, for
test_valid_alternatives_pass. Records are tests/graders/planted.py's `Mistake`: `check` names the grader's checks
(test_ch10_ulysses.CHECKS, joined by "+") that must catch it; `points_at` the regexes one of which the line the
learner reads must match.

Several give the RIGHT output the wrong way (K/V repeated to every query head before the exchange, the way back by
all-gather, no head-count limit): only a grader that reads the collectives, their bytes and the errors catches
them. `build(name)` returns an object with the three functions that the checks accept in place of
load_impl("ulysses").
"""
from __future__ import annotations

import math
import types

import torch
import torch.distributed as dist

from tests.graders.planted import Mistake

MISTAKES = [
    Mistake("10.4", "split_head_dim", "sequence_to_heads splits head_dim instead of the heads",
            (r"split the HEADS",), check="layout"),
    Mistake("10.4", "rows_interleaved", "received blocks stacked along a new last-but-one axis: rows interleaved",
            (r"interleaved",), check="layout"),
    Mistake("10.4", "way_back_wrong_heads", "heads_to_sequence puts rank j's block at the wrong heads",
            (r"the way back is the inverse",), check="layout"),
    Mistake("10.4", "gqa_kv_strided", "KV heads split by stride (head h to rank h % P), queries in blocks",
            (r"did not hold KV heads",), check="attention"),
    Mistake("10.4", "kv_repeated_before_exchange", "K and V repeated to H heads before the all-to-all",
            (r"repeated to \d+ heads before the exchange",), check="attention"),
    Mistake("10.4", "no_way_back", "the head-sharded attention output returned", (r"the way back is missing",),
            check="attention"),
    Mistake("10.4", "way_back_all_gather", "the output all-gathered and this rank's rows kept",
            (r"all-to-alls only",), check="attention"),
    Mistake("10.4", "local_rows_only", "attention over this rank's rows only, no exchange",
            (r"moved a payload of 0 B",), check="attention"),
    Mistake("10.4", "no_head_limit", "P > KV heads accepted (KV heads repeated until every rank has one)",
            (r"raised no ValueError",), check="errors"),
]

ALTERNATIVES = [
    Mistake("10.4", "alt_all_to_all_lists", "dist.all_to_all with lists of blocks and torch.cat (DeepSpeed's "
            "_SeqAllToAll form)", (), check="layout+attention+errors"),
    Mistake("10.4", "alt_packed_qkv", "q, k, v packed into ONE all-to-all, attention written out with an explicit "
            "softmax", (), check="attention+errors"),
]


def build(name: str | None):
    """The reference with `name` planted (None: unmodified)."""
    import solutions.ulysses as sol
    impl = types.SimpleNamespace(sequence_to_heads=sol.sequence_to_heads, heads_to_sequence=sol.heads_to_sequence,
                                 ulysses_attention=sol.ulysses_attention)
    if name is not None:
        _PLANT[name](sol, impl)
    return impl


def _attention(q_h, k_h, v_h, causal):
    """[S, h, D] each (k, v with h_kv heads) -> [S, h, D], written out (a valid alternative to SDPA)."""
    group = q_h.shape[1] // k_h.shape[1]
    k_h, v_h = k_h.repeat_interleave(group, dim=1), v_h.repeat_interleave(group, dim=1)
    scores = torch.einsum("shd,thd->hst", q_h, k_h) / math.sqrt(q_h.shape[-1])
    if causal:
        n = q_h.shape[0]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hst,thd->shd", torch.softmax(scores, dim=-1), v_h)


def _ulysses(to_heads, back, repeat_kv=False, limit=True):
    def ulysses_attention(q, k, v, group=None, causal=True):
        p = dist.get_world_size(group)
        if limit and p > k.shape[1]:
            raise ValueError(f"P={p} > kv_heads={k.shape[1]}")
        if repeat_kv or p > k.shape[1]:
            times = q.shape[1] // k.shape[1] if repeat_kv else p // k.shape[1]
            k, v = k.repeat_interleave(times, dim=1), v.repeat_interleave(times, dim=1)
        out = _attention(*(to_heads(t, group) for t in (q, k, v)), causal)
        return back(out, group)
    return ulysses_attention


def _split_head_dim(x, group=None):
    p = dist.get_world_size(group)
    rows, heads, d = x.shape
    blocks = x.reshape(rows, heads, p, d // p).permute(2, 0, 1, 3).contiguous()
    received = torch.empty_like(blocks)
    dist.all_to_all_single(received, blocks, group=group)
    return received.reshape(p * rows, heads, d // p)


def _rows_interleaved(x, group=None):
    p = dist.get_world_size(group)
    rows, heads, d = x.shape
    blocks = x.reshape(rows, p, heads // p, d).transpose(0, 1).contiguous()
    received = torch.empty_like(blocks)
    dist.all_to_all_single(received, blocks, group=group)
    return received.transpose(0, 1).reshape(p * rows, heads // p, d)     # rows of rank j at i·P + j


def _back_wrong_heads(x, group=None):
    p = dist.get_world_size(group)
    seq, h, d = x.shape
    blocks = x.reshape(p, seq // p, h, d).contiguous()
    received = torch.empty_like(blocks)
    dist.all_to_all_single(received, blocks, group=group)
    return received.permute(1, 2, 0, 3).reshape(seq // p, p * h, d)    # head i of rank j at i·P + j


def _strided(x, group=None):
    """sequence_to_heads with head h going to rank h % P (a stride split)."""
    p = dist.get_world_size(group)
    rows, heads, d = x.shape
    blocks = x.reshape(rows, heads // p, p, d).permute(2, 0, 1, 3).contiguous()
    received = torch.empty_like(blocks)
    dist.all_to_all_single(received, blocks, group=group)
    return received.reshape(p * rows, heads // p, d)


def _gqa_kv_strided(sol, impl):
    def ulysses_attention(q, k, v, group=None, causal=True):
        p = dist.get_world_size(group)
        if p > k.shape[1]:
            raise ValueError(f"P={p} > kv_heads={k.shape[1]}")
        q_h = sol.sequence_to_heads(q, group)
        k_h, v_h = _strided(k, group), _strided(v, group)
        return sol.heads_to_sequence(_attention(q_h, k_h, v_h, causal), group)
    impl.ulysses_attention = ulysses_attention


def _no_way_back(sol, impl):
    impl.ulysses_attention = _ulysses(sol.sequence_to_heads, lambda out, group: out)


def _way_back_all_gather(sol, impl):
    def back(out, group):
        p, r = dist.get_world_size(group), dist.get_rank(group)
        parts = [torch.empty_like(out) for _ in range(p)]
        dist.all_gather(parts, out.contiguous(), group=group)
        rows = out.shape[0] // p
        return torch.cat(parts, dim=1)[r * rows:(r + 1) * rows]
    impl.ulysses_attention = _ulysses(sol.sequence_to_heads, back)


def _local_rows_only(sol, impl):
    impl.ulysses_attention = _ulysses(lambda t, group: t, lambda out, group: out)


def _alt_lists(sol, impl):
    def to_heads(x, group=None):
        p = dist.get_world_size(group)
        if x.shape[1] % p:
            raise ValueError(f"heads={x.shape[1]} not divisible by P={p}")
        inputs = [t.contiguous() for t in torch.tensor_split(x, p, dim=1)]
        outputs = [torch.empty_like(inputs[0]) for _ in range(p)]
        dist.all_to_all(outputs, inputs, group=group)
        return torch.cat(outputs, dim=0)

    def back(x, group=None):
        p = dist.get_world_size(group)
        inputs = [t.contiguous() for t in torch.tensor_split(x, p, dim=0)]
        outputs = [torch.empty_like(inputs[0]) for _ in range(p)]
        dist.all_to_all(outputs, inputs, group=group)
        return torch.cat(outputs, dim=1)
    impl.sequence_to_heads, impl.heads_to_sequence = to_heads, back
    impl.ulysses_attention = _ulysses(to_heads, back)


def _alt_packed(sol, impl):
    def ulysses_attention(q, k, v, group=None, causal=True):
        p = dist.get_world_size(group)
        rows, heads, d = q.shape
        kv = k.shape[1]
        if p > kv:
            raise ValueError(f"P={p} > kv_heads={kv}")
        # per destination rank j: [its query heads | its K heads | its V heads], one buffer, one all-to-all
        packed = torch.cat([t.reshape(rows, p, t.shape[1] // p, d) for t in (q, k, v)], dim=2)
        blocks = packed.transpose(0, 1).contiguous()                  # [P, S/P, H/P + 2 H_kv/P, D]
        received = torch.empty_like(blocks)
        dist.all_to_all_single(received, blocks, group=group)
        full = received.reshape(p * rows, -1, d)
        q_h, k_h, v_h = full.split([heads // p, kv // p, kv // p], dim=1)
        return sol.heads_to_sequence(_attention(q_h, k_h, v_h, causal).contiguous(), group)
    impl.ulysses_attention = ulysses_attention


_PLANT = {
    "split_head_dim": lambda sol, impl: setattr(impl, "sequence_to_heads", _split_head_dim),
    "rows_interleaved": lambda sol, impl: setattr(impl, "sequence_to_heads", _rows_interleaved),
    "way_back_wrong_heads": lambda sol, impl: setattr(impl, "heads_to_sequence", _back_wrong_heads),
    "gqa_kv_strided": _gqa_kv_strided,
    "kv_repeated_before_exchange": lambda sol, impl: setattr(
        impl, "ulysses_attention", _ulysses(sol.sequence_to_heads, sol.heads_to_sequence, repeat_kv=True)),
    "no_way_back": _no_way_back,
    "way_back_all_gather": _way_back_all_gather,
    "local_rows_only": _local_rows_only,
    "no_head_limit": lambda sol, impl: setattr(
        impl, "ulysses_attention", _ulysses(sol.sequence_to_heads, sol.heads_to_sequence, limit=False)),
    "alt_all_to_all_lists": _alt_lists,
    "alt_packed_qkv": _alt_packed,
}
