"""The server's HTTP edge: hostile bodies and headers get a 4xx (never a 500), an answer sent before the
body is read reaches the client, the optional API key, and the outstanding count a cancel leaves behind
(helpers/course/serving/server.py, balancer.py; issue 12 §3)."""
import json
import os
import signal
import socket
import time

import pytest

from helpers.course import tiny_llama
from helpers.course.serving import start_server
from helpers.course.serving.metrics import parse, value

KEY = "course-test-key-7f3a"


@pytest.fixture(scope="module")
def server():
    # no watchdog here: the accounting test needs a stopped replica to stay stopped while it looks
    with start_server(replicas=1, max_batch=8, stuck_after=0, api_key=KEY) as s:
        yield s


def _exchange(port, head: bytes, body: bytes = b"", timeout=30):
    """Send a raw request, read until the server closes; returns (status, headers, JSON or raw body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    is_json = headers.get("content-type", "").startswith("application/json")
    return int(lines[0].split()[1]), headers, json.loads(payload) if is_json else payload


def _post(server, body: bytes, key=KEY, headers=()):
    head = [b"POST /v1/completions HTTP/1.1", b"Host: x", b"Content-Length: %d" % len(body), b"Connection: close"]
    head += [f"Authorization: Bearer {key}".encode()] if key is not None else []
    head += [h.encode() for h in headers]
    return _exchange(server.port, b"\r\n".join(head) + b"\r\n\r\n", body)


@pytest.mark.parametrize("body,words", [
    (b'{"prompt": "\\ud800 lone surrogate", "max_tokens": 2}', "not valid Unicode"),
    (b'{"prompt": "Four", "seed": 1' + b"0" * 5000 + b'}', "more digits"),
    (b'{"prompt": "Four", "user": ' + b"[" * 100_000 + b"]" * 100_000 + b'}', "nested too deeply"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"prompt": "Four", "temperature": NaN}', "NaN is not a JSON number"),
    (b'{"prompt": "Four", "user": {"a": [1, 2]}}', "'user' must be a string"),
    (b'\xff\xfe{"prompt": 1}', "not valid JSON"),
], ids=["lone-surrogate", "int-4301-digits", "nested-100000-in-object", "nested-100000", "nan", "user-object",
        "bad-encoding"])
def test_hostile_bodies_get_400(server, body, words):
    status, _, reply = _post(server, body)
    assert status == 400 and words in reply["error"]["message"], (status, reply)
    assert server.get("/health")["status"] == "ok"


@pytest.mark.parametrize("length,status,words", [
    ("-5", 400, "digits only"), ("+5", 400, "digits only"), ("1_0", 400, "digits only"), ("0x10", 400, "digits only"),
    ("9" * 5000, 413, "over the limit"),
], ids=["minus-5", "plus-5", "underscore", "hex", "5000-digits"])
def test_bad_content_length(server, length, status, words):
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()
    got, _, reply = _exchange(server.port, head, b'{"prompt": "Four"}')
    assert got == status and words in reply["error"]["message"], (got, reply)


def test_two_different_content_lengths_are_refused(server):
    status, _, reply = _post(server, b'{"prompt": "Four", "max_tokens": 2}', headers=["Content-Length: 3"])
    assert status == 400 and "two different Content-Length" in reply["error"]["message"], (status, reply)


def test_a_10_mb_body_gets_its_413(server):
    """The server answers 413 as soon as it reads the headers, then reads and discards the body the client
    is still sending (a lingering close): closing at once would reset the connection and the client would
    see 'connection reset' instead of the 413."""
    body = b'{"prompt": "' + b"x" * (10 << 20) + b'"}'
    status, headers, reply = _post(server, body)
    assert status == 413 and "over the limit" in reply["error"]["message"], (status, reply)
    # curl's way: ask first (Expect: 100-continue); the 413 comes back and the body is never sent
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n").encode()
    assert _exchange(server.port, head)[0] == 413
    assert server.complete(prompt="Four", max_tokens=2, temperature=0)["usage"]["completion_tokens"] == 2


def test_expect_100_continue_is_answered(server):
    body = json.dumps({"prompt": "Four", "max_tokens": 2, "temperature": 0}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head)
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200"), data[:200]


def test_api_key(server):
    """As vLLM's --api-key: every /v1 path needs 'Authorization: Bearer <key>' (401 otherwise, with
    WWW-Authenticate); /health, /metrics and /replicas stay open for probes and scrapers."""
    body = json.dumps({"prompt": "Four", "max_tokens": 2, "temperature": 0}).encode()
    for key, words in ((None, "needs an API key"), ("wrong", "wrong API key"), (KEY[:-1], "wrong API key"),
                       (KEY.upper(), "wrong API key")):
        status, headers, reply = _post(server, body, key=key)
        assert status == 401 and words in reply["error"]["message"], (key, status, reply)
        assert headers.get("www-authenticate") == "Bearer", headers
    assert _post(server, body)[0] == 200
    status, _, reply = _exchange(server.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 401, (status, reply)
    for path in ("/health", "/metrics", "/replicas"):
        status, _, _ = _exchange(server.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert status == 200, (path, status)
    # an unauthorised request is refused before its body is read, and still answered cleanly
    big = b'{"prompt": "' + b"x" * (2 << 20) + b'"}'
    assert _post(server, big, key=None)[0] == 401


def test_a_cancelled_request_counts_until_its_replica_lets_go(server):
    """A client that leaves cancels its request, but the replica holds it until it reads the cancel. A
    stopped replica never does: its outstanding count must not drop (it used to, so least-outstanding
    balancing preferred the one replica that answers nothing). SIGCONT: it acknowledges, the count drops."""
    server.wait_ready(timeout=60)
    stopped = server.replicas()[0]["pid"]
    os.kill(stopped, signal.SIGSTOP)
    try:
        before = value(parse(server.get("/metrics")), "serving_client_disconnects_total")
        body = json.dumps({"prompt": "Four", "max_tokens": 200, "temperature": 0}).encode()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n"
                     % (KEY.encode(), len(body)) + body)
        deadline = time.monotonic() + 20
        while server.replicas()[0]["outstanding"] != 1:
            assert time.monotonic() < deadline, f"the request never reached the stopped replica: {server.replicas()}"
            time.sleep(0.05)
        sock.close()
        while value(parse(server.get("/metrics")), "serving_client_disconnects_total") < before + 1:
            assert time.monotonic() < deadline, f"the server never noticed the client leaving: {server.replicas()}"
            time.sleep(0.05)
        replica = server.replicas()[0]
        assert replica["outstanding"] == 1, f"the stopped replica still holds its request: {replica}"
    finally:
        os.kill(stopped, signal.SIGCONT)
    deadline = time.monotonic() + 20
    while server.replicas()[0]["outstanding"] != 0:
        assert time.monotonic() < deadline, f"the resumed replica never acknowledged its cancel: {server.replicas()}"
        time.sleep(0.05)
    assert server.replicas()[0]["pid"] == stopped
    assert server.complete(prompt="Four", max_tokens=2, temperature=0)["usage"]["completion_tokens"] == 2
