"""helpers/course/disaggregated.py: the prefill and decode workers on real ranks, each the course's engine on its
own pool (same tokens, bytes = formula; a decode worker whose pool is full admits a transfer once blocks free up),
and the modelled comparison's promises (decodes never wait for a prompt; a blocking transfer on a slow link does
stall them; the break-even bandwidth separates the two)."""
import pytest
import torch

from helpers.claims import tolerance
from helpers.course.disaggregated import Link, break_even_bandwidth, compare_disaggregation, run_disaggregated, \
    run_disaggregated_model, transfer_bytes, tradeoff
from helpers.course.engine_loop import Workload, percentile, step_seconds
from helpers.course.tiny_llama import PROMPT, encode, generate, load_model


def test_real_ranks_same_tokens_and_bytes_equal_the_formula(monkeypatch):
    pytest.importorskip("solutions.disaggregation", reason="the reference answers are absent")
    monkeypatch.setenv("COURSE_IMPL", "solutions")
    prompts = [encode(PROMPT), encode("We hold these truths to be self-evident"), encode("The Fox and the Grapes")]
    run = run_disaggregated(prompts, 5, decode_ranks=2, show_output=False)
    model = load_model()
    assert run.tokens == [generate(model, p, 5) for p in prompts]
    for i, (prompt, transfer) in enumerate(zip(prompts, run.transfers)):
        assert transfer["decode_rank"] == 1 + i % 2 and transfer["peers"] == [transfer["decode_rank"]]
        assert transfer["bytes"] == transfer_bytes(len(prompt), 4, 4, 32)


def test_two_prefill_ranks_feed_two_decode_ranks(monkeypatch):
    pytest.importorskip("solutions.disaggregation", reason="the reference answers are absent")
    monkeypatch.setenv("COURSE_IMPL", "solutions")
    prompts = [encode(PROMPT)[:n] for n in (30, 9, 17, 25, 16)]
    run = run_disaggregated(prompts, 4, decode_ranks=2, prefill_ranks=2, show_output=False)
    model = load_model()
    assert run.tokens == [generate(model, p, 4) for p in prompts]
    pairs = {(t["prefill_rank"], t["decode_rank"]) for t in run.transfers}
    assert pairs == {(0, 2), (0, 3), (1, 2), (1, 3)}           # every prefill rank feeds every decode rank
    assert all(t["peers"] == [t["decode_rank"]] for t in run.transfers)


def test_a_full_decode_pool_admits_transfers_as_blocks_free(monkeypatch):
    """A decode worker's pool of 3 blocks holds one or two of these sequences at a time: the scheduler admits
    each transfer only when its blocks fit (recv_kv then has its blocks), never an OutOfBlocks mid-transfer."""
    pytest.importorskip("solutions.disaggregation", reason="the reference answers are absent")
    monkeypatch.setenv("COURSE_IMPL", "solutions")
    prompts = [encode(PROMPT)[:n] for n in (30, 9, 17, 25)]
    run = run_disaggregated(prompts, 4, decode_ranks=1, num_blocks=3, show_output=False)
    model = load_model()
    assert run.tokens == [generate(model, p, 4) for p in prompts]
    assert all(len(table) == -(-len(p) // 16) for p, table in zip(prompts, run.decode_tables))


def test_decodes_never_wait_for_a_prompt_when_the_transfer_overlaps():
    workload = Workload()
    result = run_disaggregated_model(workload, overlap=True)
    assert all(len(r.tokens) == r.max_tokens for r in result.requests)
    widest = max(len(s.decodes) for s in result.steps)
    longest = step_seconds(widest, 0)
    # every gap after a request's second token is one decode step (the first gap is the hand-over itself)
    gaps = [b - a for r in result.requests for a, b in zip(r.token_times[1:], r.token_times[2:])]
    # the clock is a float64 sum of the step times: one rounding per step at the scale of the makespan
    end = max(r.token_times[-1] for r in result.requests)
    assert max(gaps) <= longest + tolerance(end, torch.float64, factor=2 * len(result.steps))


def test_chapter_7_claims_on_the_engine():
    """Notebook 07's verdicts, every device an LLMEngine (vLLM V1's order): chunked (256) and disaggregated each
    keep the running decodes' ITL p99 at most half of colocated unchunked; no chunked step over its budget."""
    workload = Workload()
    ways = compare_disaggregation(workload)
    p99 = {k: percentile(r.itls(workload.decoder_ids), 99) for k, r in ways.items()}
    assert p99["chunked"] <= p99["colocated"] / 2 and p99["disaggregated"] <= p99["colocated"] / 2, p99
    assert max(s.tokens for s in ways["chunked"].steps) <= 256
    assert all(len(r.tokens) == r.max_tokens for res in ways.values() for r in res.requests)


def test_a_blocking_transfer_on_a_slow_link_stalls_the_decodes():
    workload, link = Workload(), Link(gbytes_per_s=0.01, latency_ms=1.0)
    result = run_disaggregated_model(workload, link, overlap=False)
    stall = link.seconds(transfer_bytes(workload.long_prompt, 4, 4, 32))
    assert max(result.itls(workload.decoder_ids)) >= stall


def test_break_even_bandwidth_separates_paying_from_not():
    bandwidth = break_even_bandwidth()
    links = {"2x": Link(2 * bandwidth / 1e9, 0.0), "half": Link(bandwidth / 2 / 1e9, 0.0)}
    rows = tradeoff(prompt_lens=(2048,), links=links)
    by_link = {r["link"]: r for r in rows}
    assert by_link["2x"]["disaggregated_itl_p99"] < by_link["2x"]["colocated_itl_p99"]
    assert by_link["half"]["disaggregated_itl_p99"] > by_link["half"]["colocated_itl_p99"]
