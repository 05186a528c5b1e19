"""The balancer's streaming interface (helpers/course/serving/balancer.py) with real replica processes: a stream
gives the same tokens as the whole answer, a replica killed mid-stream costs no token and repeats none, a
cancelled request's KV blocks are freed, and logprobs are the model's raw ones (vLLM's default logprobs_mode).

The balancer runs here, on this test's event loop, and forks its replicas from this process as the server does
(no launcher and no HTTP: the front end that serves these streams is tested in the server's own tests)."""
import asyncio
import os
import signal
import time

import pytest
import torch

from helpers.course import tiny_llama
from helpers.course.engine import Request
from helpers.course.serving.balancer import Balancer
from helpers.course.serving.config import ServeConfig
from helpers.course.serving.replica import build_engine

PROMPT = tiny_llama.encode(tiny_llama.PROMPT)


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    return tiny_llama.load_model()


@pytest.fixture(scope="module")
def paged():
    """Two paged replicas (the reference answers of chapter 7's exercises), on an event loop of this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COURSE_IMPL", "solutions")   # the forked replicas read it
        loop = asyncio.new_event_loop()
        balancer = Balancer(ServeConfig(data_parallel_size=2, kv_cache="paged", num_gpu_blocks_override=64,
                                        stuck_after=0, policy="round_robin"))
        try:
            loop.run_until_complete(balancer.start(timeout=60))
            yield loop, balancer
        finally:
            loop.run_until_complete(balancer.stop())
            loop.close()


async def _read(stream, on_item=None):
    """Every item of a stream; on_item(item, items so far) is called after each."""
    items = []
    async for out in stream:
        items.append(out)
        if on_item is not None:
            on_item(out, items)
    return items


def _tokens(items):
    return [t for out in items for t in out["token_ids"]]


def _params(balancer, rid):
    """The parameters the balancer holds for request rid (its seed included)."""
    return next(r.inflight[rid].params for r in balancer.replicas if rid in r.inflight)


def test_a_stream_gives_the_whole_answer_token_by_token(paged, model):
    """Greedy, seeded and unseeded sampled requests, streamed and whole: the same tokens; greedy ones are the
    model's; an item per step (one token each here) and a last item marked finished with the replica's timings."""
    loop, balancer = paged

    async def run():
        cases = [dict(temperature=0.0), dict(temperature=0.9, seed=7), dict(temperature=0.9, top_p=0.8)]
        streams = [balancer.submit({"prompt": PROMPT, "max_tokens": 10, **c}) for c in cases]
        seeds = [_params(balancer, s.rid).get("seed") for s in streams]
        streamed = await asyncio.gather(*(_read(s) for s in streams))
        whole = []
        for c, seed in zip(cases, seeds):
            whole.append(_tokens(await _read(balancer.submit({"prompt": PROMPT, "max_tokens": 10, **c, "seed": seed}))))
        return streamed, whole, seeds

    streamed, whole, seeds = loop.run_until_complete(run())
    assert seeds[0] is None and seeds[1] == 7 and isinstance(seeds[2], int), \
        f"the balancer draws a seed for an unseeded sampled request only: {seeds}"
    for items, tokens in zip(streamed, whole):
        assert _tokens(items) == tokens and len(tokens) == 10
        assert all(len(out["token_ids"]) <= 1 for out in items), "one step, one token per request"
        assert [out["finished"] for out in items] == [False] * (len(items) - 1) + [True]
        assert items[-1]["timings"]["total"] >= items[-1]["timings"]["first_token"] > 0
    assert whole[0] == tiny_llama.generate(model, PROMPT, 10)


def test_a_replica_killed_mid_stream_costs_no_token(paged):
    """SIGKILL the replica serving an unseeded sampled stream after 5 of its 64 tokens: the stream goes on from
    the other replica, and the client receives exactly the tokens an unkilled run gives (the seed the balancer
    drew), none twice."""
    loop, balancer = paged
    killed = []

    def kill_after_five(out, items):
        if not killed and len(_tokens(items)) >= 5:
            killed.append(out["replica"])
            os.kill(balancer.replicas[out["replica"]].process.pid, signal.SIGKILL)

    async def run():
        stream = balancer.submit({"prompt": PROMPT, "max_tokens": 64, "temperature": 1.0, "logprobs": 2})
        seed = _params(balancer, stream.rid)["seed"]
        items = await _read(stream, kill_after_five)
        unkilled = await _read(balancer.submit({"prompt": PROMPT, "max_tokens": 64, "temperature": 1.0, "seed": seed}))
        return items, _tokens(unkilled)

    items, unkilled = loop.run_until_complete(run())
    assert killed and items[-1]["retries"] == 1 and items[-1]["replica"] != killed[0], items[-1]
    assert _tokens(items) == unkilled and len(unkilled) == 64
    logprobs = [entry for out in items for entry in out["logprobs"]]
    assert len(logprobs) == 64 and all(len(e["top"]) == 2 for e in logprobs), "one logprob entry per token"


def test_cancel_frees_the_requests_kv_blocks(paged):
    """A request cancelled mid-stream (a client gone, a stop string found): its stream ends without a finished
    item, and its replica's KV cache holds no block any more (its stats report, as /metrics exports it)."""
    loop, balancer = paged

    async def used_blocks(replica, want, timeout=20):
        deadline = time.monotonic() + timeout
        while not want(balancer.replicas[replica].stats.get("kv_blocks_used", -1)):
            assert time.monotonic() < deadline, f"replica {replica}: {balancer.replicas[replica].stats}"
            await asyncio.sleep(0.02)

    async def run():
        await balancer.wait_ready(2, timeout=60)
        stream = balancer.submit({"prompt": PROMPT * 3, "max_tokens": 150, "temperature": 0})
        items = []
        async for out in stream:
            items.append(out)
            if len(items) == 3:
                replica = out["replica"]
                await used_blocks(replica, lambda used: used > 0)
                balancer.cancel(stream.rid)
        await used_blocks(replica, lambda used: used == 0)
        return items, replica

    items, replica = loop.run_until_complete(run())
    assert len(items) == 3 and not items[-1]["finished"], "the stream ends at the cancel"
    assert balancer.replicas[replica].outstanding == 0


def test_logprobs_are_the_models_raw_logprobs(model):
    """logprobs=k records, per generated token, its logprob and the k best [token, logprob] under log_softmax of
    the model's logits, before temperature (vLLM's logprobs_mode="raw_logprobs"): checked against the model run
    on prompt + generated tokens, at float32's precision."""
    engine = build_engine(model, ServeConfig(max_num_seqs=4))
    engine.add_request(Request(0, PROMPT, 8, temperature=1.5, seed=3, logprobs=3))
    engine.add_request(Request(1, PROMPT[:5], 8, logprobs=0))
    done = {}
    while engine.has_unfinished:
        done.update({r.rid: r for r in engine.step()})
    for request in done.values():
        ids = torch.tensor([request.prompt + request.tokens])
        with torch.no_grad():
            expected = model(ids).logits[0, len(request.prompt) - 1:-1].float().log_softmax(-1)
        assert len(request.output_logprobs) == len(request.tokens)
        for position, (token, entry) in enumerate(zip(request.tokens, request.output_logprobs)):
            row = expected[position]
            assert entry["logprob"] == pytest.approx(float(row[token]), abs=1e-4)
            best = torch.topk(row, request.logprobs)
            assert [t for t, _ in entry["top"]] == best.indices.tolist()
            assert [v for _, v in entry["top"]] == pytest.approx(best.values.tolist(), abs=1e-4)
    greedy = done[1]
    assert all(e["top"] == [] for e in greedy.output_logprobs), "logprobs=0: the chosen token's logprob only"
    with pytest.raises(ValueError, match="logprobs"):
        Request(2, PROMPT, 4, logprobs=-1)

