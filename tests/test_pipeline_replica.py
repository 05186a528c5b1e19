"""The pipeline replica (helpers/course/serving/pipeline_replica.py) on the course's engine
(helpers/course/engine/pipeline_runner.py): the single-process model's tokens, several batches in flight, a cancel
freeing the request on every stage; in this process (LocalPipeline), through a replica's pipe, and served."""
import multiprocessing as mp
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers.claims import max_abs_diff, tolerance
from helpers.course import tiny_llama
from helpers.course.engine import LLMEngine, Request, SchedulerConfig
from helpers.course.engine.pipeline_runner import LocalPipeline, PipelineEngine, PipelineStageRunner, \
    both_busy_seconds, modelled_pipeline
from helpers.course.llama_stages import LlamaStage
from helpers.course.serving import start_server
from helpers.course.serving.config import ServeConfig
from helpers.course.serving.replica import replica_main

PROMPTS = ["Four score and seven years ago", "We hold these", "A", "The fox and the grapes", "Once upon a time"]
LENGTHS = [12, 7, 9, 15, 5]


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_llama.load_model().eval()


@pytest.fixture(scope="module")
def reference(model):
    return [tiny_llama.generate(model, tiny_llama.encode(p), n) for p, n in zip(PROMPTS, LENGTHS)]


@pytest.fixture(autouse=True)
def solutions(monkeypatch):
    monkeypatch.setenv("COURSE_IMPL", "solutions")   # the paged cache and schedule_step are chapter 7's exercises


def local_engine(model, kv_cache, depth=2, balance=True, num_blocks=64, **options):
    stages = [PipelineStageRunner(LlamaStage(model, s, 2), kv_cache, num_blocks=num_blocks) for s in range(2)]
    engine = PipelineEngine.build(LocalPipeline(stages), kv_cache, num_blocks=num_blocks,
                                  max_concurrent_batches=depth, balance=balance, **options)
    return engine, stages


def serve(engine, requests, every=1):
    """Request i joins before driver step i * every (every=0: all at once); runs to the end."""
    step = 0
    pending = list(requests)
    while pending or engine.has_unfinished:
        while pending and (every == 0 or step % every == 0):
            engine.add_request(pending.pop(0))
            if every:
                break
        engine.step()
        step += 1
        assert not engine.take_failed()


@pytest.mark.parametrize("kv_cache", ["contiguous", "paged", "paged+prefix caching"])
def test_local_pipeline_gives_the_models_tokens_with_two_batches_in_flight(model, reference, kv_cache):
    caching = kv_cache.endswith("caching")
    kv_cache = kv_cache.split("+")[0]
    prompts = [tiny_llama.encode(("A shared system prompt of two blocks, or nearly so. " if caching else "") + p)
               for p in PROMPTS]
    if caching:
        reference = [tiny_llama.generate(model, p, n) for p, n in zip(prompts, LENGTHS)]
    for depth in (1, 2):
        engine, stages = local_engine(model, kv_cache, depth, enable_prefix_caching=caching)
        requests = [Request(i, p, n) for i, (p, n) in enumerate(zip(prompts, LENGTHS))]
        serve(engine, requests)
        assert [r.tokens for r in requests] == reference, f"depth {depth}"
        if caching:      # later requests hit the prefix blocks an earlier batch computed (in flight or not)
            assert engine.kv.stats.hits >= 3 * 16 * (len(PROMPTS) - 1), engine.kv.stats
        # one batch in flight never overlaps; two do, and no request is ever in both
        assert (engine.overlapped_launches > 0) == (depth == 2), engine.overlapped_launches
        assert not engine.in_flight and not engine.batch_queue
        assert [s.num_requests for s in stages] == [0, 0] and engine.stage_requests == [0, 0]
        if kv_cache == "paged":
            assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_a_request_is_in_one_batch_in_flight_at_a_time(model):
    engine, _ = local_engine(model, "contiguous", depth=2)
    launched, overlaps = [], []
    launch = engine.executor.launch

    def spy(batch):
        rids = {e[0] for e in batch.entries}
        launched.append(sorted(rids))
        for other, _ in list(engine.batch_queue)[:-1]:      # the batches still in flight
            overlaps.extend(rids & {e[0] for e in other.entries})
        launch(batch)
    engine.executor.launch = spy
    requests = [Request(i, tiny_llama.encode(p), 6) for i, p in enumerate(PROMPTS)]
    for r in requests:
        engine.add_request(r)
    while engine.has_unfinished:
        engine.step()
    # the 5 prompts are admitted together; then the running requests alternate between two groups (balance: at
    # most ceil(5 / 2) of them in a batch)
    assert launched[:4] == [[0, 1, 2, 3, 4], [0, 1, 2], [3, 4], [0, 1, 2]], launched[:4]
    assert not overlaps and engine.overlapped_launches > 0


def test_two_batches_in_flight_beat_one_in_modelled_time(model):
    """Same load (8 requests of 16 tokens, arriving at once), one batch in flight vs two: the trace replayed on
    modelled device time (each stage 1/2 of the layers). Two in flight: both stages compute at once, and the
    decode throughput is higher."""
    figures = {}
    for depth in (1, 2):
        engine, _ = local_engine(model, "paged", depth)
        requests = [Request(i, tiny_llama.encode(f"Request {i} says"), 16) for i in range(8)]
        serve(engine, requests, every=0)
        replay = modelled_pipeline(engine.trace, pp=2)
        figures[depth] = (sum(len(r.tokens) for r in requests) / replay["seconds"], replay["both"])
    assert figures[1][1] == 0 and figures[2][1] > 0, figures
    assert figures[2][0] > 1.05 * figures[1][0], figures


def test_cancel_in_flight_frees_every_stage(model):
    for kv_cache in ("contiguous", "paged"):
        engine, stages = local_engine(model, kv_cache, depth=2)
        requests = [Request(i, tiny_llama.encode(p), 40) for i, p in enumerate(PROMPTS[:3])]
        for r in requests:
            engine.add_request(r)
        for _ in range(6):
            engine.step()
        victim = next(rid for rid in engine.in_flight)       # its batch is in flight right now
        assert engine.abort(victim)
        while engine.has_unfinished:
            engine.step()
        assert [s.num_requests for s in stages] == [0, 0], kv_cache
        assert requests[victim].tokens and len(requests[victim].tokens) < 40
        assert all(len(r.tokens) == 40 for r in requests if r.rid != victim)
        if kv_cache == "paged":
            assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_paged_pipeline_preempts_and_chunks_with_the_models_tokens(model):
    """A small pool (8 blocks of 16) and a budget of 16 tokens per step: prompts are chunked and requests preempted
    (recomputed) while other batches are in flight; the tokens stay the model's."""
    prompts = [tiny_llama.encode(f"Request number {i} says hello to") for i in range(3)]
    reference = [tiny_llama.generate(model, p, 24) for p in prompts]
    engine, _ = local_engine(model, "paged", num_blocks=8,
                             config=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=8))
    requests = [Request(i, p, 24) for i, p in enumerate(prompts)]
    serve(engine, requests, every=0)
    assert [r.tokens for r in requests] == reference
    assert engine.scheduler.num_preemptions > 0 and engine.overlapped_launches > 0
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_a_stage_that_raises_fails_its_batch_only(model):
    """A stage's exception travels down the pipeline with the batch: the batch's requests fail (request 1 is alone
    in its batches: it arrives while request 0's batch is in flight), the others go on."""
    engine, stages = local_engine(model, "contiguous", depth=2)
    run = stages[1]._contiguous

    def broken(batch, x):
        if any(e[0] == 1 for e in batch.entries):
            raise RuntimeError("stage 1 broke")
        return run(batch, x)
    stages[1]._contiguous = broken
    requests = [Request(i, tiny_llama.encode(p), 6) for i, p in enumerate(PROMPTS[:2])]
    serve_failed = []
    engine.add_request(requests[0])
    engine.step()
    engine.add_request(requests[1])
    while engine.has_unfinished:
        engine.step()
        serve_failed += engine.take_failed()
    assert [r.rid for r in serve_failed] == [1] and "stage 1 broke" in serve_failed[0].error
    assert len(requests[0].tokens) == 6 and [s.num_requests for s in stages] == [0, 0]


def test_both_busy_seconds_counts_overlap():
    assert both_busy_seconds([(0, 1, 0.0, 2.0), (1, 1, 1.0, 3.0), (0, 2, 3.0, 4.0)]) == (1.0, 4.0)


# ------------------------------------------------------------------------ a real pipeline: 2 ranks
def _replica(config):
    parent, child = mp.Pipe()
    process = mp.get_context("fork").Process(target=replica_main, args=(child, 0, config))
    process.start()
    child.close()
    return parent, process


def _recv(conn, deadline):
    if not conn.poll(max(0.0, deadline - time.monotonic())):
        raise TimeoutError("the replica said nothing")
    return conn.recv()


def test_pipe_pp2_replica_tokens_sampling_cancel_and_overlap(model, reference):
    """A pp=2 replica driven over its pipe (replica.py's messages): greedy requests get the model's tokens,
    streamed then done; a seeded sampled request the single-process engine's samples; a cancelled
    request is dropped by both stages; both stages computed at once."""
    conn, process = _replica(ServeConfig(pipeline_parallel_size=2, data_parallel_size=1, max_num_seqs=8))
    deadline = time.monotonic() + 60
    try:
        assert _recv(conn, deadline)[0] == "ready"
        done, streamed, stats, logprobs = {}, {}, None, []
        for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS)):
            conn.send(("submit", i, {"prompt": tiny_llama.encode(p), "max_tokens": n, "temperature": 0}))
        conn.send(("submit", "s", {"prompt": tiny_llama.encode("Once"), "max_tokens": 12, "temperature": 0.9,
                                   "top_p": 0.9, "seed": 7, "logprobs": 2}))
        conn.send(("submit", "x", {"prompt": [1, 2, 3], "max_tokens": 200, "temperature": 0}))
        cancelled = False
        while len(done) < len(PROMPTS) + 1 or not cancelled:
            msg = _recv(conn, deadline)
            if msg[0] == "tokens":
                streamed.setdefault(msg[1], []).extend(msg[2])
                if msg[3] is not None:
                    logprobs.extend(msg[3])
                if msg[1] == "x" and len(streamed["x"]) >= 3 and not cancelled:
                    conn.send(("cancel", "x"))
                    cancelled = True
            elif msg[0] == "done":   # with the last step's tokens and their logprobs (replica.send_tokens)
                done[msg[1]] = msg[2]
                got = streamed.setdefault(msg[1], [])
                got.extend(msg[2][len(got):])
                if msg[4] is not None:
                    logprobs.extend(msg[4])
            assert msg[0] != "failed", msg
        while True:          # the cancel reaches both stages with the next message down the pipeline
            msg = _recv(conn, deadline)
            if msg[0] == "stats" and msg[1]["running"] == 0 and msg[1]["pipeline"]["stage_requests"] == [0, 0]:
                stats = msg[1]
                break
        assert [done[i] for i in range(len(PROMPTS))] == reference
        assert all(streamed[rid] == done[rid] for rid in done)
        single = LLMEngine.contiguous(model)
        sampled = Request("s", tiny_llama.encode("Once"), 12, temperature=0.9, top_p=0.9, seed=7, logprobs=2)
        single.add_request(sampled)
        while single.has_unfinished:
            single.step()
        assert done["s"] == sampled.tokens
        want = sampled.output_logprobs                     # the raw distribution's, computed by rank 0
        assert [[i for i, _ in g["top"]] for g in logprobs] == [[i for i, _ in w["top"]] for w in want]
        got = torch.tensor([[g["logprob"]] + [v for _, v in g["top"]] for g in logprobs])
        close = torch.tensor([[w["logprob"]] + [v for _, v in w["top"]] for w in want])
        assert max_abs_diff(got, close) <= tolerance(close), (got, close)
        pipeline = stats["pipeline"]
        assert pipeline["overlapped_launches"] > 0 and pipeline["both_busy_seconds"] > 0, pipeline
        assert all(busy > 0 for busy in pipeline["stage_busy_seconds"]), pipeline
    finally:
        conn.close()
        process.join(20)
        if process.is_alive():
            process.kill()
    assert process.exitcode == 0


def test_served_pp2_gives_the_models_tokens_with_batches_in_flight(model):
    """python -m helpers.course.serving --pp 2: concurrent requests (long enough to run together however the machine
    schedules the clients), the model's tokens; /replicas shows batches launched while another was in flight."""
    reference = [tiny_llama.generate(model, tiny_llama.encode(p), 32) for p in PROMPTS]
    with start_server(replicas=1, pp=2, max_batch=8, env={"COURSE_IMPL": "solutions"}) as s:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            replies = list(pool.map(lambda p: s.complete(prompt=p, max_tokens=32, temperature=0,
                                                         return_token_ids=True), PROMPTS))
        assert [r["choices"][0]["token_ids"] for r in replies] == reference
        replica = s.replicas()[0]
        assert replica["pipeline"]["overlapped_launches"] > 0, replica
