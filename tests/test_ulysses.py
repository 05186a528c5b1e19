"""helpers/course/ulysses.py with the reference Ulysses (solutions/ulysses.py) on real gloo ranks: equal to SDPA on
the whole sequence; the bytes each rank sent (CommTracer) equal to the formula, and beside ring attention's (chapter
8) measured the same way; the head-count limit; the hybrid Ulysses × ring layout that lifts it."""
import pytest
import torch
import torch.nn.functional as F

from helpers import launch
from helpers.claims import max_abs_diff, tolerance
from helpers.comm_trace import CommTracer
from helpers.course import ulysses as U
from helpers.course.ring_attention import positions_of_rank

SEQ, HEADS, KV_HEADS, HEAD_DIM = 32, 8, 4, 8


def _inputs(heads=HEADS, kv_heads=KV_HEADS):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(SEQ, heads, HEAD_DIM, generator=g), torch.randn(SEQ, kv_heads, HEAD_DIM, generator=g),
            torch.randn(SEQ, kv_heads, HEAD_DIM, generator=g))


def _sdpa(q, k, v):
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                         enable_gqa=True)
    return out.transpose(0, 1)


def _job(rank, world_size, kv_heads):
    from solutions.context_parallel import ring_attention
    from solutions.ulysses import ulysses_attention
    q, k, v = _inputs(kv_heads=kv_heads)
    want = _sdpa(q, k, v)
    result = {}
    if world_size <= kv_heads:
        with CommTracer() as trace:
            out = ulysses_attention(*(U.shard_rows(t, rank, world_size) for t in (q, k, v)))
        result["ulysses"] = (max_abs_diff(out, U.shard_rows(want, rank, world_size)),
                             sum(r.wire for r in trace.records), sorted({r.op for r in trace.records}))
    else:
        try:
            ulysses_attention(*(U.shard_rows(t, rank, world_size) for t in (q, k, v)))
            result["limit"] = "no error"
        except ValueError as exc:
            result["limit"] = str(exc)
    # ring attention (chapter 8) on the same inputs: K/V repeated to the query heads, as its q, k, v share a shape
    pos = positions_of_rank(SEQ, rank, world_size, "zigzag")
    with CommTracer() as trace:
        ring_attention(*(t[pos].repeat_interleave(HEADS // t.shape[1], 1).transpose(0, 1).contiguous()
                         for t in (q, k, v)))
    result["ring_sent"] = sum(r.wire for r in trace.records if r.op in ("isend", "send"))
    if world_size == 4:
        ulysses_group, ring_group = U.hybrid_groups(4, 2)
        with CommTracer() as trace:
            out = U.hybrid_attention(*(U.shard_rows(t, rank, 4) for t in (q, k, v)), ulysses_group, ring_group)
        result["hybrid"] = max_abs_diff(out, U.shard_rows(want, rank, 4))
    result["tol"] = tolerance(want, torch.float32)
    return result


@pytest.mark.parametrize("world_size", [2, 4])
def test_ulysses_equals_sdpa_and_sends_the_formulas_bytes(monkeypatch, world_size):
    monkeypatch.setenv("COURSE_IMPL", "solutions")
    results = launch(_job, world_size, KV_HEADS, show_output=False, timeout=60)
    want = U.ulysses_bytes_per_rank(SEQ, HEADS, KV_HEADS, HEAD_DIM, world_size)["sent"]
    for r in results:
        diff, sent, ops = r["ulysses"]
        assert diff <= r["tol"]
        assert ops == ["all_to_all_single"] and sent == want
        assert r["ring_sent"] == U.ring_bytes_per_rank(SEQ, HEADS, HEAD_DIM, world_size)   # K/V with the query heads
    # Ulysses / ring = (H + H_kv) / (P · H) against this ring (K/V repeated to H heads); (H + H_kv) / (P · H_kv)
    # against a ring that moves only the KV heads
    ring = U.ring_bytes_per_rank(SEQ, HEADS, HEAD_DIM, world_size)
    assert want * world_size * HEADS == ring * (HEADS + KV_HEADS)


def test_head_count_limit_and_the_hybrid_that_lifts_it(monkeypatch):
    monkeypatch.setenv("COURSE_IMPL", "solutions")
    results = launch(_job, 4, 2, show_output=False, timeout=60)          # 4 ranks, 2 KV heads
    for r in results:
        assert "kv_heads=2" in r["limit"]
        assert r["hybrid"] <= r["tol"]
    assert U.max_ulysses_degree(2) == 2
