"""The chapter 6 server (helpers/course/serving): batching policies give the model's tokens, bad requests get clear
400s and leave the server healthy, a client that disconnects is cancelled, a killed replica loses no request,
and stopping leaves no process behind."""
import json
import os
import signal
import socket
import threading
import time
import urllib.error

import pytest

from helpers import proctree
from helpers.course import tiny_llama
from helpers.course.serving import start_server
from helpers.course.engine import LLMEngine, Request, run_requests
from helpers.course.serving.config import ServeConfig
from helpers.course.serving.replica import build_engine
from helpers.course.serving.loadtest import load_test
from helpers.course.serving.metrics import parse, value

PROMPTS = ["Four score and seven years ago", "We hold these", "A", "The fox and the grapes"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # tests/conftest.py


def test_batching_policies_give_the_models_tokens():
    model = tiny_llama.load_model()
    ids = [tiny_llama.encode(p) for p in PROMPTS]
    lengths = [10, 6, 3, 8]
    reference = [tiny_llama.generate(model, p, n) for p, n in zip(ids, lengths)]
    steps = {}
    for batching in ("none", "static", "continuous"):
        engine = build_engine(model, ServeConfig(batching=batching, max_num_seqs=3))
        for i, (p, n) in enumerate(zip(ids, lengths)):
            engine.add_request(Request(i, p, n))
        out = {}
        for _ in range(200):
            for seq in engine.step():
                out[seq.rid] = seq.tokens
            if not engine.has_unfinished:
                break
        assert [out[i] for i in range(4)] == reference, batching
        steps[batching] = engine.num_steps
    assert steps["continuous"] < steps["static"] < steps["none"], steps


def test_sampling_is_reproducible_with_a_seed():
    model = tiny_llama.load_model()
    runs = []
    for max_batch in (1, 4):
        engine = build_engine(model, ServeConfig(max_num_seqs=max_batch))
        for i, p in enumerate(PROMPTS):
            engine.add_request(Request(i, tiny_llama.encode(p), 8, temperature=0.8, top_p=0.9, seed=1234 + i))
        out = {}
        while engine.has_unfinished:
            out.update({s.rid: s.tokens for s in engine.step()})
        runs.append(out)
    assert runs[0] == runs[1], "a seeded request must not depend on what it was batched with"


@pytest.fixture(scope="module")
def server():
    with start_server(replicas=2, max_batch=8) as s:
        yield s


def _post(server, raw: bytes, headers=None):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        head = [b"POST /v1/completions HTTP/1.1", b"Host: x", f"Content-Length: {len(raw)}".encode(),
                b"Connection: close"] + [h.encode() for h in (headers or [])]
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + raw)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("raw,status,words", [
    (b'{"prompt": "Four", ', 400, "not valid JSON"),
    (b'[1, 2]', 400, "JSON object"),
    (b'{"max_tokens": 4}', 400, "'prompt' is required"),
    (b'{"prompt": "Four", "max_new_tokens": 4}', 400, "use max_tokens"),
    (b'{"prompt": "Four", "best_of": 2}', 400, "unknown parameter"),
    (b'{"prompt": "Four", "max_tokens": "ten"}', 400, "'max_tokens' must be an integer"),
    (b'{"prompt": "Four", "max_tokens": 0}', 400, "out of range"),
    (b'{"prompt": "Four", "temperature": -1}', 400, "out of range"),
    (b'{"prompt": "Four", "stream": "yes"}', 400, "'stream' must be true or false"),
    (b'{"prompt": [1, 2, 999]}', 400, "token ids must lie in"),
    (b'{"prompt": ""}', 400, "empty"),
    (b'{"prompt": ["a", "b"]}', 400, "one prompt per request"),
    (b'{"prompt": "Four", "model": "gpt-4"}', 404, "not served here"),
    (json.dumps({"prompt": "x" * 250, "max_tokens": 16}).encode(), 400, "maximum context length is 256"),
])
def test_bad_requests_get_a_clear_error(server, raw, status, words):
    got, body = _post(server, raw)
    assert got == status and words in body["error"]["message"], (got, body)
    assert body["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error"), body
    assert server.get("/health")["status"] == "ok"


def test_protocol_errors(server):
    with pytest.raises(urllib.error.HTTPError) as e:
        server.get("/v2/nothing")
    assert e.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as e:
        server.get("/v1/completions")
    assert e.value.code == 405 and "POST" in e.value.headers["Allow"]


def test_good_request_and_disconnect(server):
    reply = server.complete(prompt=tiny_llama.PROMPT, max_tokens=12, temperature=0, return_token_ids=True)
    expected = tiny_llama.generate(tiny_llama.load_model(), tiny_llama.encode(tiny_llama.PROMPT), 12)
    assert reply["choices"][0]["token_ids"] == expected and reply["usage"]["completion_tokens"] == 12
    before = value(parse(server.get("/metrics")), "serving_client_disconnects_total")
    body = json.dumps({"prompt": "Four", "max_tokens": 200, "temperature": 0}).encode()
    # the replicas are stopped (SIGSTOP) while the client leaves, so the request cannot finish first on a fast machine
    stopped = [r["pid"] for r in server.replicas()]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
                     + body)
        time.sleep(0.3)
        sock.close()  # leave before the answer
        deadline = time.monotonic() + 20
        while value(parse(server.get("/metrics")), "serving_client_disconnects_total") == before:
            assert time.monotonic() < deadline, "the server never noticed the client leaving"
            time.sleep(0.1)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    assert server.complete(prompt="Four", max_tokens=2, temperature=0)["usage"]["completion_tokens"] == 2


def test_killed_replica_loses_no_request(server):
    expected = tiny_llama.generate(tiny_llama.load_model(), tiny_llama.encode(tiny_llama.PROMPT), 16)
    killer = threading.Timer(0.4, server.kill_replica, args=(0,))
    killer.start()
    result = load_test(server.url, n_requests=30, rate=40, max_tokens=16, prompts=(tiny_llama.PROMPT,),
                       max_seconds=60)
    killer.join()
    summary = result.summary()
    assert summary["lost"] == 0 and summary["ok"] == 30, [r for r in result.records if r["status"] != 200][:3]
    assert all(r["token_ids"] == expected for r in result.ok)
    assert sum(r["retries"] for r in result.ok) >= 1, "the kill should have caught requests in flight"
    server.wait_ready(timeout=60)
    assert server.replicas()[0]["restarts"] == 1


def test_stop_leaves_no_process():
    s = start_server(replicas=1, max_batch=2)
    pids = [s.process.pid] + [r["pid"] for r in s.replicas()]
    s.stop()
    assert not proctree.wait_gone(pids, timeout=2.0), "stop() left a front end or a replica running"


def test_pipeline_replica_pp2_tp2_gives_the_models_tokens():
    """One replica of 2 pipeline stages × 2 TP ranks (helpers/course/serving/pipeline_replica.py): several requests
    at once, the unsharded model's greedy tokens, and a seeded sample equal to the one-process engine's."""
    from concurrent.futures import ThreadPoolExecutor
    model = tiny_llama.load_model()
    lengths = [10, 4, 7, 10]
    reference = [tiny_llama.generate(model, tiny_llama.encode(p), n) for p, n in zip(PROMPTS, lengths)]
    with start_server(replicas=1, pp=2, tp=2, max_batch=4, env={"COURSE_IMPL": "solutions"}) as s:
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda a: s.complete(prompt=a[0], max_tokens=a[1], temperature=0,
                                                         return_token_ids=True), zip(PROMPTS, lengths)))
        assert [r["choices"][0]["token_ids"] for r in replies] == reference
        # the pipeline's rank 0 samples with the request's own generator: a seeded request gives the one-process
        # engine's tokens (pipeline_runner.py)
        sampled = s.complete(prompt="A", max_tokens=6, temperature=0.9, seed=5, return_token_ids=True)
        alone = run_requests(LLMEngine.contiguous(model), [Request(0, tiny_llama.encode("A"), 6, temperature=0.9,
                                                                   seed=5)])
        assert sampled["choices"][0]["token_ids"] == alone.requests[0].tokens
        assert s.get("/health")["replicas_up"] == 1
