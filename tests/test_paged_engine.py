"""Chapter 6's replica engine on chapter 7's paged KV cache (helpers/course/engine via serving.replica.build_engine):
the same tokens as
the contiguous engine under every option (prefix caching, chunked prefill, a pool small enough to preempt,
seeded sampling), steps within the token budget, every block back in the pool at the end, a request too big
for the pool failing alone, the server's options and metrics, and a tensor-parallel replica whose ranks each
hold their own KV heads."""
import pytest

from helpers import load_impl
from helpers.course import tiny_llama
from helpers.course.paged_llama import PagedLlamaRunner
from helpers.course.serving import start_server
from helpers.course.serving import background
from helpers.course.serving.__main__ import parse_args
from helpers.course.serving.config import ServeConfig
from helpers.course.engine import Request
from helpers.course.serving.metrics import ServingMetrics, parse, value
from helpers.course.serving.replica import build_engine
from helpers.launch import launch

SYSTEM = "You are a helpful assistant who answers briefly. "
PROMPTS = [SYSTEM + p for p in ("Four score and", "We hold these truths", "It was the best", "Call me",
                                "In the beginning", "To be or not")]


@pytest.fixture(scope="module")
def model():
    return tiny_llama.load_model().eval()


def serve(engine, temperature=0.0, max_tokens=12):
    for i, p in enumerate(PROMPTS):
        engine.add_request(Request(i, tiny_llama.encode(p), max_tokens + i, temperature=temperature, seed=100 + i))
    out = {}
    for _ in range(1000):
        out.update({s.rid: s.tokens for s in engine.step()})
        failed = engine.take_failed()
        assert not failed, failed[0].traceback
        if not engine.has_unfinished:
            return out
    raise AssertionError("the engine did not finish in 1000 steps")


OPTIONS = {
    "paged": {},
    "prefix caching": {"enable_prefix_caching": True},
    "chunked prefill": {"max_num_batched_tokens": 16},
    "prefix caching + chunked": {"enable_prefix_caching": True, "max_num_batched_tokens": 16},
    "small pool (preempts)": {"num_gpu_blocks_override": 12, "block_size": 8, "max_num_batched_tokens": 8,
                              "enable_prefix_caching": True},
}


def paged_config(**options):
    return ServeConfig(max_num_seqs=4, kv_cache="paged", **options)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_the_paged_engine_gives_the_contiguous_engines_tokens(model, temperature):
    want = serve(build_engine(model, ServeConfig(max_num_seqs=4)), temperature)
    for name, options in OPTIONS.items():
        engine = build_engine(model, paged_config(**options))
        assert serve(engine, temperature) == want, f"{name}: other tokens than the contiguous engine's"
        stats = engine.kv_stats()
        assert stats["kv_blocks_used"] == 0, f"{name}: {stats['kv_blocks_used']} blocks still held after the last"
        if options.get("enable_prefix_caching"):
            assert stats["prefix_hits"] > 0 and stats["prefix_queries"] >= sum(map(len, map(tiny_llama.encode,
                                                                                           PROMPTS)))
        if "num_gpu_blocks_override" in options:
            assert stats["preemptions"] > 0, f"{name}: a pool of 12 blocks of 8 should have preempted"


def test_chunked_steps_stay_within_the_token_budget(model):
    engine = build_engine(model, paged_config(max_num_batched_tokens=16))
    engine.record_steps = True
    paged, computed = engine.runner.paged, []
    forward = paged.forward_batch

    def count(batch, all_logits=False):           # what the model really computed in each forward
        computed.append(sum(len(ids) for _, ids, _ in batch))
        return forward(batch, all_logits)

    paged.forward_batch = count
    for i, p in enumerate(PROMPTS):
        engine.add_request(Request(i, tiny_llama.encode(p), 6))
    while engine.has_unfinished:
        engine.step()
    assert len(computed) == len(engine.steps), "one forward per step"
    assert computed == [step.tokens for step in engine.steps]
    assert max(computed) <= 16, f"a step computed {max(computed)} tokens, over the budget of 16"
    assert max(computed) == 16, "long prompts should fill the budget"
    assert any(step.decodes and step.chunks for step in engine.steps), "decodes and prompt chunks share a forward"
    capped = build_engine(model, paged_config(max_num_batched_tokens=32, long_prefill_token_threshold=8))
    assert (capped.config.max_num_batched_tokens, capped.config.long_prefill_token_threshold) == (32, 8)


def test_a_request_too_big_for_the_pool_fails_alone_and_cancel_frees_blocks(model):
    engine = build_engine(model, paged_config(num_gpu_blocks_override=4, block_size=8))
    short = tiny_llama.encode("Call me")
    engine.add_request(Request(0, tiny_llama.encode(SYSTEM * 3), 4))     # more than 4 × 8 tokens
    engine.add_request(Request(1, short, 4))
    engine.add_request(Request(2, short, 20))
    done = {s.rid: s.tokens for s in engine.step()}
    failed = {s.rid: s.error for s in engine.take_failed()}
    assert list(failed) == [0] and "does not fit" in failed[0], failed
    assert engine.kv_stats()["kv_blocks_used"] == 2
    assert engine.abort(2) and engine.kv_stats()["kv_blocks_used"] == 1
    while engine.has_unfinished:
        done.update({s.rid: s.tokens for s in engine.step()})
    assert done == {1: tiny_llama.generate(model, short, 4)}
    assert engine.kv_stats()["kv_blocks_used"] == 0


def test_server_options_and_their_errors(monkeypatch):
    """One ServeConfig: vLLM's flags and the course's older ones give the same config, which the command line
    start_server writes gives back; a wrong option is refused with its reason, before any process starts."""
    config = parse_args(["--kv-cache", "paged", "--enable-prefix-caching", "--max-num-batched-tokens", "64",
                         "--num-blocks", "128", "--max-batch", "4", "--tp", "2", "--no-restart"])
    assert config == parse_args(["--kv-cache", "paged", "--enable-prefix-caching", "--max-num-batched-tokens", "64",
                                 "--num-gpu-blocks-override", "128", "--max-num-seqs", "4",
                                 "--tensor-parallel-size", "2", "--no-restart"])
    assert config == ServeConfig.from_options(kv_cache="paged", enable_prefix_caching=True, max_num_batched_tokens=64,
                                              num_blocks=128, max_batch=4, tp=2, restart=False)
    assert (config.num_gpu_blocks_override, config.block_size, config.max_num_seqs, config.tensor_parallel_size,
            config.restart) == (128, 16, 4, 2, False)
    assert parse_args(config.to_argv()) == config and parse_args([]) == ServeConfig()
    scheduler = config.scheduler_config(tiny_llama.CONFIG)
    assert (scheduler.max_num_batched_tokens, scheduler.max_num_seqs) == (64, 4)
    assert ServeConfig(max_num_seqs=3).scheduler_config(tiny_llama.CONFIG).max_num_batched_tokens == \
        3 * tiny_llama.CONFIG.max_position_embeddings                                   # whole prompts
    wrong = {"--enable-prefix-caching needs --kv-cache paged": ["--enable-prefix-caching"],
             "--max-num-batched-tokens needs --kv-cache paged": ["--max-num-batched-tokens", "64"],
             "--num-gpu-blocks-override/--num-blocks 0 must be": ["--kv-cache", "paged", "--num-blocks", "0"],
             "--tensor-parallel-size/--tp 0 must be": ["--tp", "0"],
             "loopback only": ["--host", "0.0.0.0"],
             "too short": ["--stuck-after", "1"]}
    for why, argv in wrong.items():
        with pytest.raises(SystemExit):
            parse_args(argv)
        with pytest.raises(ValueError, match=why):       # the same check from Python (start_server's options)
            ServeConfig.from_options(**_as_options(argv))
    monkeypatch.setattr(background, "_launcher", lambda: pytest.fail("a process was started"))
    monkeypatch.setattr(background.subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    with pytest.raises(ValueError, match="needs --kv-cache paged"):
        start_server(replicas=1, enable_prefix_caching=True)
    with pytest.raises(TypeError, match="unknown server option"):
        start_server(replica=1)


def _as_options(argv):
    """The fields a command line sets (parsed without the checks, to build the same config from Python)."""
    args = ServeConfig.parser().parse_args(argv)
    return {k: v for k, v in vars(args).items() if v != ServeConfig.__dataclass_fields__[k].default}


def test_a_server_whose_pool_cannot_hold_one_full_request_refuses_to_start():
    with pytest.raises(RuntimeError, match=r"(.|\n)*--num-blocks 4 × --block-size 16 = 64 tokens(.|\n)*at least 16"):
        start_server(replicas=1, kv_cache="paged", num_blocks=4)


def test_kv_metrics_count_what_grew_and_restart_from_zero():
    metrics = ServingMetrics()
    report = {"kv_blocks_used": 3, "kv_blocks": 12, "prefix_queries": 100, "prefix_hits": 60, "preemptions": 1}
    metrics.observe_kv(0, report, {})
    metrics.observe_kv(0, dict(report, prefix_queries=150, prefix_hits=90), report)
    metrics.observe_kv(0, dict(report, prefix_queries=20, prefix_hits=0, preemptions=0),       # a new process
                       dict(report, prefix_queries=150, prefix_hits=90))
    metrics.observe_kv(1, {"busy_seconds": 1.0}, {})                                           # contiguous: none
    scraped = parse(metrics.exposition().decode())
    assert value(scraped, "serving_prefix_cache_queries_total") == 170
    assert value(scraped, "serving_prefix_cache_hits_total") == 90
    assert value(scraped, "serving_num_preemptions_total") == 1
    assert value(scraped, "serving_kv_cache_usage_perc", replica=0) == 0.25


def _paged_tp_rank(rank, world_size, prompts):
    model = load_impl("tp_llama").shard_llama(tiny_llama.load_model())
    engine = PagedLlamaRunner(model, num_blocks=32, block_size=16)
    return {"ids": engine.generate(prompts, 8), "kv_heads": engine.pool.kv_heads,
            "bytes_per_token": engine.pool.bytes_per_token}


def test_a_tensor_parallel_rank_holds_its_own_kv_heads(model):
    prompts = [tiny_llama.encode(p) for p in PROMPTS[:3]]
    whole = PagedLlamaRunner(model, num_blocks=32, block_size=16)
    want = whole.generate(prompts, 8)
    ranks = launch(_paged_tp_rank, 2, prompts, show_output=False)
    for r in ranks:
        assert r["ids"] == want
        assert r["kv_heads"] * 2 == whole.pool.kv_heads and r["bytes_per_token"] * 2 == whole.pool.bytes_per_token


def test_a_tensor_parallel_replica_serves_from_the_paged_cache(model):
    with start_server(replicas=1, tp=2, kv_cache="paged", enable_prefix_caching=True, max_num_batched_tokens=32) as s:
        answers = [s.complete(prompt=p, max_tokens=8, temperature=0, return_token_ids=True)["choices"][0]["token_ids"]
                   for p in PROMPTS[:3]]
        scraped = parse(s.get("/metrics"))
    assert answers == [tiny_llama.generate(model, tiny_llama.encode(p), 8) for p in PROMPTS[:3]]
    assert value(scraped, "serving_prefix_cache_hits_total") > 0
