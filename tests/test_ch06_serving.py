"""Graders for chapter 6's capstone (labs/capstone/): a served, balanced, monitored tiny Llama."""
import math
from collections import Counter

import pytest

from helpers import load_impl
from helpers import tiny_llama

PROMPTS = ["Four score and seven years ago", "We hold these truths", "The fox and the grapes",
           "Once upon a time", "A", "It is altogether fitting", "The tortoise", "Liberty"]


@pytest.fixture(scope="module")
def reference():
    model = tiny_llama.load_model()
    return {p: tiny_llama.generate(model, tiny_llama.encode(p), 12) for p in PROMPTS}


@pytest.mark.exercise("6.1", "check a (dp, pp, tp) plan; ranks of each replica")
def test_plan():
    plan = load_impl("capstone.plan")
    P = plan.Plan
    for good in (P(1, 1, 1), P(2, 1, 1), P(2, 1, 2), P(1, 2, 4), P(1, 4, 8)):
        assert plan.check_plan(good, tiny_llama.CONFIG) == good
    for bad, word in ((P(0, 1, 1), "dp"), (P(1, 1, 3), "tp=3"), (P(1, 3, 1), "pp=3"), (P(True, 1, 1), "dp"),
                      (P(1, 1, 16), "tp=16")):
        with pytest.raises(ValueError, match=word):
            plan.check_plan(bad, tiny_llama.CONFIG)
    assert plan.replica_ranks(P(2, 1, 2)) == [[[0, 1]], [[2, 3]]]
    assert plan.replica_ranks(P(1, 2, 2)) == [[[0, 1], [2, 3]]]
    assert plan.replica_ranks(P(3, 1, 1)) == [[[0]], [[1]], [[2]]]
    layout = plan.replica_ranks(P(2, 2, 2))
    assert sorted(r for rep in layout for stage in rep for r in stage) == list(range(8))
    assert layout[1][0] == [4, 5], f"replica 1, stage 0 should hold ranks [4, 5], got {layout[1][0]}"


@pytest.mark.exercise("6.2", "round robin and least outstanding requests")
def test_choose_replica():
    choose = load_impl("capstone.router").choose_replica
    assert [choose("round_robin", [0, 0, 0], t) for t in range(6)] == [0, 1, 2, 0, 1, 2]
    assert [choose("round_robin", [5, None, 0], t) for t in range(4)] == [0, 2, 0, 2], "skip replicas that are down"
    assert [choose("least_outstanding", [3, 1, 2], t) for t in range(3)] == [1, 1, 1]
    assert [choose("least_outstanding", [1, 4, 1], t) for t in range(4)] == [0, 2, 0, 2], "ties rotate"
    assert choose("least_outstanding", [None, 9, None], 7) == 1
    with pytest.raises(ValueError):
        choose("least_outstanding", [None, None], 0)
    with pytest.raises(ValueError):
        choose("random", [0, 0], 0)


def _metrics_text():
    from helpers.serving.metrics import ServingMetrics
    m = ServingMetrics()
    for seconds in (0.02, 0.03, 0.04, 0.2):
        m.latency.observe(seconds)
    m.requests.labels(endpoint="/v1/completions", status=200).inc(4)
    m.requests.labels(endpoint="/v1/completions", status=400).inc(2)
    m.requests.labels(endpoint="/metrics", status=200).inc(7)
    m.tokens.inc(64)
    m.busy.labels(replica=0).inc(1.5)
    m.busy.labels(replica=1).inc(0.25)
    return m.exposition().decode()


@pytest.mark.exercise("6.3", "a performance report from Prometheus metrics")
def test_summarize():
    report = load_impl("capstone.report").summarize(_metrics_text())
    assert report["requests"] == 4 and report["errors"] == 2, report
    assert report["tokens"] == 64
    assert report["busy_seconds"] == {0: 1.5, 1: 0.25}
    assert 0.025 <= report["p50"] <= 0.05, f"p50 {report['p50']} should fall in the (0.025, 0.05] bucket"
    assert 0.1 <= report["p99"] <= 0.25, f"p99 {report['p99']} should fall in the (0.1, 0.25] bucket"
    empty = load_impl("capstone.report").summarize("")
    assert empty["requests"] == 0 and math.isnan(empty["p99"])


def _serve_and_check(plan, reference, policy):
    capstone = load_impl("capstone.engine")
    with capstone.CapstoneEngine(plan, policy=policy) as engine:
        results = engine.generate(PROMPTS, max_tokens=12)
        report = engine.report()
    for prompt, got in zip(PROMPTS, results):
        assert got["tokens"] == reference[prompt], \
            f"{prompt!r}: served tokens {got['tokens']} differ from the unsharded model's {reference[prompt]}"
    per_replica = Counter(r["replica"] for r in results)
    assert set(per_replica) == set(range(plan.dp)), f"every replica should serve: {dict(per_replica)}"
    assert report["requests"] == len(PROMPTS) and report["tokens"] == 12 * len(PROMPTS), report
    assert set(report["busy_seconds"]) == set(range(plan.dp)) and all(v > 0 for v in report["busy_seconds"].values())
    return per_replica


@pytest.mark.exercise("6.4", "CapstoneEngine: dp=2 replicas serve the unsharded model's tokens, balanced, measured")
def test_engine_data_parallel(reference):
    capstone = load_impl("capstone.engine")
    plan = load_impl("capstone.plan")
    with pytest.raises(ValueError):
        capstone.CapstoneEngine(plan.Plan(dp=1, tp=3))
    per_replica = _serve_and_check(plan.Plan(dp=2, pp=1, tp=1), reference, "round_robin")
    assert per_replica[0] == per_replica[1] == len(PROMPTS) // 2, f"round robin splits evenly: {dict(per_replica)}"


@pytest.mark.exercise("6.5", "CapstoneEngine with tensor-parallel replicas (chapter 2's shard_llama)")
def test_engine_tensor_parallel(reference):
    plan = load_impl("capstone.plan")
    _serve_and_check(plan.Plan(dp=1, pp=1, tp=2), reference, "least_outstanding")


@pytest.mark.exercise("6.6", "pipeline-parallel plan: pp=2 stages serve the unsharded model's tokens")
def test_engine_pipeline_parallel(reference):
    plan = load_impl("capstone.plan")
    _serve_and_check(plan.Plan(dp=1, pp=2, tp=1), reference, "least_outstanding")
