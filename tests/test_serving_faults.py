"""No request can kill a replica, and a stuck replica is noticed (helpers/course/serving, issue 12 §3).

This module is also a model module for the server (`--model tests.test_serving_faults`): the course's tiny
Llama with two planted faults, so that "a bug inside the engine, hit by one request" can be sent over HTTP:

    a prompt holding the NUL byte (token 0)     the model raises during that request's prefill
    a prompt holding byte 1 (token 1)           the model's logits for that request are NaN
    a sequence reaching position 200            the model raises in any decode step it is part of
                                                (so a whole batch fails, and the engine must find which one)

Ordinary prompts never meet them, so every other request gets the tiny Llama's own tokens.
"""
import asyncio
import errno
import json
import math
import os
import resource
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers import proctree
from helpers.course import tiny_llama
from helpers.course.serving import start_server
from helpers.course.engine import Request, sample
from helpers.course.serving.balancer import Balancer
from helpers.course.serving.config import ServeConfig
from helpers.course.serving.replica import build_engine, group_broken, public
from helpers.course.serving.loadtest import load_test
from helpers.course.serving.metrics import ServingMetrics, parse, value

RAISES_IN_PREFILL, NAN_LOGITS, RAISES_AT_POSITION = 0, 1, 200
CONFIG, encode, decode, PROMPT = tiny_llama.CONFIG, tiny_llama.encode, tiny_llama.decode, tiny_llama.PROMPT


class FaultyLlama(torch.nn.Module):
    """The tiny Llama with the planted faults above."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, position_ids=None, past_key_values=None, **kwargs):
        if past_key_values is None and bool((input_ids == RAISES_IN_PREFILL).any()):
            raise RuntimeError("planted bug: this model fails on a prompt holding token 0")
        if position_ids is not None and bool((position_ids >= RAISES_AT_POSITION).any()):
            raise RuntimeError(f"planted bug: this model fails at position {RAISES_AT_POSITION}")
        out = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=past_key_values,
                         **kwargs)
        if past_key_values is None and bool((input_ids == NAN_LOGITS).any()):
            out.logits[:] = float("nan")
        return out


def load_model():
    return FaultyLlama(tiny_llama.load_model())


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tests/conftest.py


def _reference(prompt, n):
    return tiny_llama.generate(tiny_llama.load_model(), tiny_llama.encode(prompt), n)


# ---------------------------------------------------------------- the engine, in this process

@pytest.mark.parametrize("temperature", [1e-300, 1e-45, 1e-6, 5e-3, 0.01])
def test_sampling_survives_tiny_temperatures(temperature):
    """logits / 1e-45 overflows float32: softmax gives NaN and torch.multinomial raises. Below
    SAMPLING_EPS the sampler is greedy; up to MIN_TEMPERATURE it uses MIN_TEMPERATURE (vLLM's rule)."""
    logits = torch.linspace(-20, 30, CONFIG.vocab_size)
    token = sample(logits, temperature, 1.0, torch.Generator().manual_seed(0))
    assert token == int(torch.argmax(logits)), (temperature, token)


@pytest.mark.parametrize("temperature,top_p", [(math.nan, 1.0), (0.7, math.nan), (math.inf, 1.0)])
def test_sampling_refuses_non_finite_parameters_with_a_value_error(temperature, top_p):
    with pytest.raises(ValueError, match="finite"):
        sample(torch.zeros(CONFIG.vocab_size), temperature, top_p, torch.Generator().manual_seed(0))


def test_engine_fails_only_the_broken_sequences():
    """Five sequences in one continuous batch: two ordinary ones and three that fail (a prefill that
    raises, NaN logits, a decode step that raises once the sequence reaches position 200 — the whole
    batched step raises then). Only those three fail, with their own error; the others get the model's
    tokens."""
    model = tiny_llama.load_model()
    engine = build_engine(FaultyLlama(model), ServeConfig(max_num_seqs=8))
    good = {0: (encode("Four score"), 12), 1: (encode("We hold these"), 9)}
    long_prompt = (encode(PROMPT) * 20)[:RAISES_AT_POSITION - 4]
    bad = {2: ([72, RAISES_IN_PREFILL, 105], 5, 0.0, "token 0"),
           3: ([72, NAN_LOGITS, 105], 5, 0.7, "NaN"),
           4: (long_prompt, 10, 0.0, f"position {RAISES_AT_POSITION}")}
    for rid, (prompt, n) in good.items():
        engine.add_request(Request(rid, prompt, n))
    for rid, (prompt, n, temperature, _) in bad.items():
        engine.add_request(Request(rid, prompt, n, temperature=temperature, seed=rid))
    done, failed = {}, {}
    for _ in range(100):
        done.update({s.rid: s.tokens for s in engine.step()})
        failed.update({s.rid: s.error for s in engine.take_failed()})
        if not engine.has_unfinished:
            break
    assert sorted(failed) == sorted(bad), f"failed: {failed}, finished: {sorted(done)}; expected {sorted(bad)} to fail"
    for rid, (*_, words) in bad.items():
        assert words in failed[rid], f"sequence {rid} failed with {failed[rid]!r}, expected it to mention {words!r}"
    for rid, (prompt, n) in good.items():
        assert done.get(rid) == tiny_llama.generate(model, prompt, n), f"sequence {rid} lost its tokens"


# ---------------------------------------------------------------- the server, over HTTP

@pytest.fixture(scope="module")
def server():
    # round robin: a stopped replica keeps getting every other request until the watchdog acts
    with start_server(replicas=2, max_batch=8, policy="round_robin", stuck_after=3.0,
                      model="tests.test_serving_faults") as s:
        yield s


def _post(server, raw: bytes, timeout=60):
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % len(raw) + raw)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


# (raw body, expected status, words in the error or None): the sampling parameters that used to kill a
# replica (NaN, 1e-300, 1e-45 made torch.multinomial raise), and requests that hit a bug in the engine
POISON = [
    (b'{"prompt": "Four", "max_tokens": 4, "temperature": NaN}', 400, "NaN"),
    (b'{"prompt": "Four", "max_tokens": 4, "temperature": Infinity}', 400, "Infinity"),
    (b'{"prompt": "Four", "max_tokens": 4, "temperature": 1e400}', 400, "finite"),
    (b'{"prompt": "Four", "max_tokens": 4, "temperature": 0.7, "top_p": NaN}', 400, "NaN"),
    (b'{"prompt": "Four", "max_tokens": 4, "temperature": -1e-300}', 400, "out of range"),
    (b'{"prompt": "Four", "max_tokens": 4, "temperature": 1e-300}', 200, None),
    (b'{"prompt": "Four", "max_tokens": 4, "temperature": 1e-45}', 200, None),
    (b'{"prompt": "Four", "max_tokens": 4, "temperature": 0.005, "seed": 3}', 200, None),
    (b'{"prompt": "Four", "max_tokens": 4, "temperature": 1.0, "top_p": 1e-300, "seed": 3}', 200, None),
    (b'{"prompt": [72, 0, 105], "max_tokens": 4, "temperature": 0}', 500, "token 0"),
    (b'{"prompt": [72, 1, 105], "max_tokens": 4, "temperature": 0.7}', 500, "NaN"),
]


def test_poison_requests_under_load_fail_alone(server):
    """Every poison request gets its own clear answer (400 for bad sampling parameters, 500 for the
    engine bug it hits) while a load of ordinary requests runs: none of those is lost, no replica
    restarts, nothing is retried."""
    pids = [r["pid"] for r in server.replicas()]
    before = parse(server.get("/metrics"))
    expected = _reference(PROMPT, 12)
    box = {}
    loader = threading.Thread(target=lambda: box.update(result=load_test(
        server.url, n_requests=40, rate=40, max_tokens=12, prompts=(PROMPT,), max_seconds=90)))
    loader.start()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda case: _post(server, case[0]), POISON * 2))
    loader.join()
    for (raw, status, words), (got, body) in zip(POISON * 2, answers):
        assert got == status, f"{raw.decode()}: expected HTTP {status}, got {got}: {body}"
        if words is not None:
            message = body["error"]["message"]
            assert words in message, f"{raw.decode()}: {message!r} should say {words!r}"
    greedy = _reference("Four", 4)
    for (raw, status, _), (got, body) in zip(POISON, answers):
        if status == 200 and b"1e-" in raw and b"seed" not in raw:  # below SAMPLING_EPS: greedy
            assert body["choices"][0]["text"] == decode(greedy), raw
    summary = box["result"].summary()
    assert summary["ok"] == 40 and summary["lost"] == 0, [r for r in box["result"].records if r["status"] != 200][:3]
    assert all(r["token_ids"] == expected for r in box["result"].ok)
    after = parse(server.get("/metrics"))
    assert [r["pid"] for r in server.replicas()] == pids, f"a replica was restarted: {server.replicas()}"
    assert value(after, "serving_replica_restarts_total") == value(before, "serving_replica_restarts_total")
    assert value(after, "serving_retries_total") == value(before, "serving_retries_total"), \
        "a request that failed on its own was retried on another replica"
    assert value(after, "serving_requests_total", endpoint="/v1/completions", status=500) == \
        value(before, "serving_requests_total", endpoint="/v1/completions", status=500) + 4


def test_a_batch_step_that_raises_fails_one_request(server):
    """A request that reaches position 200 breaks every decode step it is in: it alone gets a 500, the
    requests batched with it finish."""
    long_prompt = (encode(PROMPT) * 20)[:RAISES_AT_POSITION - 4]
    bodies = [{"prompt": long_prompt, "max_tokens": 12, "temperature": 0}] + \
        [{"prompt": PROMPT, "max_tokens": 12, "temperature": 0}] * 5
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda b: _post(server, json.dumps(b).encode()), bodies))
    assert answers[0][0] == 500 and f"position {RAISES_AT_POSITION}" in answers[0][1]["error"]["message"], answers[0]
    expected = _reference(PROMPT, 12)
    for status, body in answers[1:]:
        assert status == 200 and body["choices"][0]["text"] == decode(expected), (status, body)
    assert all(r["restarts"] == 0 for r in server.replicas()), server.replicas()


def test_a_stopped_replica_is_replaced_and_its_requests_retried(server):
    """SIGSTOP replica 0: it stays alive and its pipe stays open, so only its silence tells. The watchdog
    (no heartbeat for stuck_after = 3 s) takes it out of rotation, kills it, retries its requests on
    replica 1 and starts a new replica 0. Every request of the load test is answered with the model's
    tokens, long before the front end's 120 s timeout (the load test gives each request 30 s)."""
    expected = _reference(PROMPT, 8)
    server.wait_ready(timeout=60)
    stopped = server.replicas()[0]["pid"]
    os.kill(stopped, signal.SIGSTOP)  # the load test starts at once: the watchdog needs 3 s to notice
    try:
        result = load_test(server.url, n_requests=16, rate=16, max_tokens=8, prompts=(PROMPT,), max_seconds=90,
                           request_timeout=30)
        summary = result.summary()
        assert summary["ok"] == 16 and summary["lost"] == 0, [r for r in result.records if r["status"] != 200][:3]
        assert all(r["token_ids"] == expected for r in result.ok)
        assert sum(r["retries"] for r in result.ok) >= 1, "round robin sent requests to the stopped replica"
        server.wait_ready(timeout=60)
        replica = server.replicas()[0]
        assert replica["stuck"] == 1 and replica["restarts"] == 1 and replica["pid"] != stopped, replica
        assert not proctree.wait_gone([stopped], timeout=10), f"the stopped replica (pid {stopped}) is still there"
        assert server.complete(prompt=PROMPT, max_tokens=8, temperature=0)["usage"]["completion_tokens"] == 8
    finally:
        try:
            os.kill(stopped, signal.SIGCONT)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------- the balancer, in this process

def _greedy(prompt, lengths) -> dict:
    """{n: the model's first n greedy tokens} for each n, computed on one thread (the module's one_torch_thread:
    several spin against the replicas for the two cores of a busy machine, ten times slower)."""
    tokens = tiny_llama.generate(tiny_llama.load_model(), prompt, max(lengths))
    return {n: tokens[:n] for n in lengths}


async def _collect(stream):
    """A stream's tokens, or the exception it raised."""
    tokens = []
    try:
        async for out in stream:
            tokens += out["token_ids"]
    except Exception as e:      # RequestFailed, NoReplicaError: what a client would get as an error
        return e
    return tokens


def test_killing_a_rank_of_a_tp_replica_loses_no_request():
    """20 concurrent streams on 2 replicas of 2 TP ranks; SIGKILL rank 1 of replica 0 while they run, then, under a
    second load, rank 0 of replica 1. Rank 0 sees gloo's "Connection closed by peer" inside its step: that is
    the death of the replica (it exits, the balancer retries its requests on the other replica), not a failure of
    the requests it held. Every request gets the model's tokens, none an error."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COURSE_IMPL", "solutions")   # chapter 2's shard_llama, read by the forked ranks
        asyncio.run(_kill_ranks(ServeConfig(data_parallel_size=2, tensor_parallel_size=2, stuck_after=0,
                                            policy="round_robin")))


def test_killing_a_stage_of_a_pipeline_replica_loses_no_request():
    """The same with 2 replicas of 2 pipeline stages: SIGKILL stage 1 (rank 1) of replica 0, then stage 0 (rank 0,
    the scheduler's rank) of replica 1. A stage's death breaks its replica's sends and receives: the replica exits
    and its requests are retried on the other one (pipeline_replica.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COURSE_IMPL", "solutions")
        asyncio.run(_kill_ranks(ServeConfig(data_parallel_size=2, pipeline_parallel_size=2, stuck_after=0,
                                            policy="round_robin")))


async def _kill_ranks(config):
    prompt, lengths = encode(PROMPT), [24 + 8 * (i % 2) for i in range(20)]
    expected = _greedy(prompt, set(lengths))
    balancer = Balancer(config)
    try:
        await balancer.start(timeout=60)
        for replica, rank in ((0, 1), (1, 0)):
            await balancer.wait_ready(2, timeout=60)
            victim, before = balancer.replicas[replica].ranks[rank], balancer.replicas[replica].stats["tokens"]
            streams = [balancer.submit({"prompt": prompt, "max_tokens": n, "temperature": 0}) for n in lengths]
            results = asyncio.gather(*(_collect(s) for s in streams))
            deadline = time.monotonic() + 30
            while balancer.replicas[replica].stats["tokens"] < before + 20:      # it is decoding its share
                assert time.monotonic() < deadline, balancer.describe()
                await asyncio.sleep(0.01)
            os.kill(victim, signal.SIGKILL)
            got = await asyncio.wait_for(results, timeout=120)
            errors = [g for g in got if isinstance(g, Exception)]
            assert not errors, f"rank {rank} of replica {replica} killed: {len(errors)} of 20 failed: {errors[:2]}"
            assert got == [expected[n] for n in lengths]
            assert balancer.replicas[replica].restarts == 1, balancer.describe()
    finally:
        await balancer.stop()


def test_a_collectives_failure_is_the_replicas_and_no_client_reads_its_internals():
    """What gloo raises in a step when a peer rank is gone ends the replica (replica.group_broken); what a request's
    own failure says reaches its client without C++ source paths or addresses (replica.public)."""
    gloo = ("RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
            "[127.0.0.1]:39329: Connection reset by peer. This is typically caused by a remote worker hanging")
    assert group_broken(gloo) and group_broken("RuntimeError: Connection closed by peer [10.0.0.2]:4242")
    assert not group_broken("RuntimeError: planted bug: this model fails on a prompt holding token 0")
    assert not group_broken("ValueError: the model's logits hold NaN: no token to choose")
    cleaned = public(gloo)
    assert "pair.cc" not in cleaned and "/__w/" not in cleaned and "39329" not in cleaned, cleaned
    assert cleaned.startswith("RuntimeError: Read error <address>: Connection reset by peer"), cleaned


def test_a_replica_whose_respawn_fails_comes_back_and_says_why(monkeypatch):
    """Replica 0 is killed while this process has no file descriptor left (EMFILE, as under `ulimit -n 256`
    with idle connections held): mp.Pipe() fails, so no new process can start. The balancer tries again with
    backoff, health() says why (what /health answers), serving_replica_spawn_failures_total counts the tries,
    replica 1 serves meanwhile; once descriptors are free again the replica comes back."""
    monkeypatch.setenv("COURSE_IMPL", "solutions")   # exercise 6.2's choose_replica
    metrics = ServingMetrics()
    expected = _greedy(encode(PROMPT), [6])[6]

    async def run():
        balancer = Balancer(ServeConfig(data_parallel_size=2, stuck_after=0), metrics)
        await balancer.start(timeout=60)
        try:
            held, limits = [], resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(map(int, os.listdir("/proc/self/fd"))) + 32,
                                                        limits[1]))
            try:
                with pytest.raises(OSError) as full:
                    while True:
                        held.append(os.open(os.devnull, os.O_RDONLY))
                assert full.value.errno == errno.EMFILE
                os.kill(balancer.replicas[0].process.pid, signal.SIGKILL)
                deadline = time.monotonic() + 30
                while value(parse(metrics.exposition().decode()), "serving_replica_spawn_failures_total") < 2:
                    assert time.monotonic() < deadline, balancer.describe()
                    await asyncio.sleep(0.02)
                health = balancer.health()
                served = await _collect(balancer.submit({"prompt": encode(PROMPT), "max_tokens": 6,
                                                         "temperature": 0}))
            finally:
                for fd in held:
                    os.close(fd)
                resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            await balancer.wait_ready(2, timeout=30)
            return health, served, balancer.health(), balancer.replicas[0].restarts
        finally:
            await balancer.stop()

    health, served, after, restarts = asyncio.run(run())
    assert health["replicas_up"] == 1 and "Too many open files" in health["reasons"]["0"], health
    assert served == expected, "replica 1 serves while replica 0 cannot start"
    assert after == {"status": "ok", "replicas_up": 2, "replicas": 2, "reasons": {}} and restarts == 1, after


def test_paged_replicas_with_labs_stubs_fall_back_or_refuse_to_start(monkeypatch):
    """`python -m helpers.course.serving --kv-cache paged` with labs/ as shipped (exercises 7.1, 7.2, 7.4 unwritten)
    used to serve: healthy, and every request failed with NotImplementedError. Under a grader (COURSE_FALLBACK=0)
    the server does not start and says which exercises; in a learner's terminal (COURSE_FALLBACK unset) one line
    says so and the replicas run the reference answers: requests get the model's tokens."""
    from helpers.impl import unwritten_exercises
    if "BlockManager" not in unwritten_exercises("labs/paged_kv_cache.py"):
        pytest.skip("exercise 7.1 is written in labs/")
    options = dict(replicas=1, kv_cache="paged", port=0, env={"COURSE_IMPL": "labs"})
    monkeypatch.setenv("COURSE_FALLBACK", "0")
    with pytest.raises(RuntimeError, match=r"exited with code 1:\n.*Exercise 7\.1, Exercise 7\.2, Exercise 7\.4, "
                                           r"not written yet \(labs/chunked_prefill.py, labs/paged_kv_cache.py\)"):
        start_server(**options)
    monkeypatch.delenv("COURSE_FALLBACK")
    with start_server(**options) as s:
        reply = s.complete(prompt=PROMPT, max_tokens=6, temperature=0, return_token_ids=True)
        log = open(s.log_path).read()
    assert reply["choices"][0]["token_ids"] == _greedy(encode(PROMPT), [6])[6]
    assert log.count("Exercise 7.1, Exercise 7.2, Exercise 7.4 not written yet in labs/") == 1, log
