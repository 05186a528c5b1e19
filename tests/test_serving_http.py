"""The server's HTTP edge, spoken to over raw sockets as a hostile or clumsy client would: malformed input gets a
4xx naming what is wrong (never a 500), body and header limits, slow clients timed out without blocking others,
a half-closed client answered, a disconnect cancelling its request, the connection cap, keep-alive, HEAD and 405,
the API key, loopback only, ids unique across restarts (helpers/course/serving/limits.py, server.py; issue 20).

The server runs with short timeouts and a small connection cap ($SERVING_LIMITS, limits.Limits.from_env) so that
the slow-client and cap tests take seconds."""
import json
import logging
import os
import select
import signal
import socket
import threading
import time

import pytest

from helpers.course.serving import start_server
from helpers.course.serving.limits import Limits, RateLimitFilter
from helpers.course.serving.metrics import parse, value

KEY = "course-test-key-7f3a"
CAP = 32
TIMEOUT = 2.0    # header, body and keep-alive timeouts of the test server, in seconds
LIMITS = f"max_connections={CAP},header_timeout={TIMEOUT},body_timeout={TIMEOUT},keep_alive_timeout={TIMEOUT}"


@pytest.fixture(scope="module")
def server():
    # no watchdog here: the accounting test needs a stopped replica to stay stopped while it looks
    env = {"SERVING_LIMITS": LIMITS, "COURSE_IMPL": "solutions"}   # the balancer's policy is exercise 6.2's
    with start_server(replicas=1, max_batch=8, stuck_after=0, api_key=KEY, env=env) as s:
        yield s
        print(f"the server's log, last 6000 characters:\n{s._log_text()[-6000:]}")   # shown if a test failed


def _read_response(sock, head_request=False) -> tuple[int, dict, object, bytes]:
    """Read one response (skipping 1xx interim ones) from `sock`: (status, headers, JSON or raw body, the rest).
    head_request: the answer to a HEAD request, whose Content-Length is that of the GET's body, which is not sent."""
    data = b""
    while True:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"the server closed the connection before answering: {data[:200]!r}"
            data += chunk
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if status >= 200:
            break
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = 0 if head_request else int(headers.get("content-length", -1))
    while length < 0 or len(data) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    payload, rest = (data[:length], data[length:]) if length >= 0 else (data, b"")
    is_json = headers.get("content-type", "").startswith("application/json") and payload
    return status, headers, json.loads(payload) if is_json else payload, rest


def _exchange(port, data: bytes, timeout=30, half_close=False):
    """Send raw bytes, read one response; returns (status, headers, JSON or raw body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return _read_response(sock)[:3]


def _request(method, path, body=b"", key=KEY, headers=(), close=True) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}"]
    head += [f"Authorization: Bearer {key}"] if key is not None else []
    head += ["Connection: close"] if close else []
    return ("\r\n".join(head + list(headers)) + "\r\n\r\n").encode() + body


def _post(server, body: bytes, key=KEY, headers=(), path="/v1/completions"):
    return _exchange(server.port, _request("POST", path, body, key, headers))


def _completion(max_tokens=2, **extra) -> bytes:
    return json.dumps({"prompt": "Four", "max_tokens": max_tokens, "temperature": 0, **extra}).encode()


@pytest.mark.parametrize("body,words", [
    (b'{"prompt": "\\ud800 lone surrogate", "max_tokens": 2}', "not valid Unicode"),
    (b'{"prompt": "Four", "seed": 1' + b"0" * 5000 + b'}', "more digits"),
    (b'{"prompt": "Four", "user": ' + b"[" * 100_000 + b"]" * 100_000 + b'}', "nested too deeply"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"prompt": "Four", "temperature": NaN}', "NaN is not a JSON number"),
    (b'{"prompt": "Four", "user": {"a": [1, 2]}}', "'user' must be a string"),
    (b'{"prompt": "Four", "temperature": "hot"}', "'temperature' must be a number"),
    (b'{"prompt": "Four", "max_tokens": 100000}', "'max_tokens'=100000 is out of range"),
    (b'{"prompt": "Four", "max_new_tokens": 3}', "'max_new_tokens': use max_tokens"),
    (b'\xff\xfe{"prompt": 1}', "not valid JSON"),
], ids=["lone-surrogate", "int-4301-digits", "nested-100000-in-object", "nested-100000", "nan", "user-object",
        "wrong-type", "out-of-range", "renamed-parameter", "bad-encoding"])
def test_hostile_bodies_get_400(server, body, words):
    status, _, reply = _post(server, body)
    assert status == 400 and words in reply["error"]["message"], (status, reply)
    assert reply["error"]["type"] == "invalid_request_error", reply
    assert server.get("/health")["status"] == "ok"


@pytest.mark.parametrize("data,words", [
    (b"GARBAGE\r\n\r\n", "illegal request line"),
    (b"GET /health HTTP/1.1\r\n\r\n", "Host"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n", "illegal header line"),
    *[(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n".encode(), "Content-Length")
      for n in ("-5", "+5", "1_0", "0x10", "9" * 5000)],
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 3\r\n\r\n", "Content-Length"),
], ids=["request-line", "no-host", "header-line", "cl-minus", "cl-plus", "cl-underscore", "cl-hex", "cl-5000-digits",
        "two-content-lengths"])
def test_malformed_http_gets_400_naming_it(server, data, words):
    """h11 parses HTTP here; its reason reaches the client in an OpenAI error object (uvicorn alone sends a plain
    'Invalid HTTP request received.')."""
    status, headers, reply = _exchange(server.port, data)
    assert status == 400 and words in reply["error"]["message"], (status, reply)
    assert headers.get("connection") == "close"


def test_lf_only_request_lines_are_answered_at_once(server):
    """The old server waited 10 s for a CRLF CRLF that a client ending lines with LF never sends."""
    start = time.monotonic()
    status, _, reply = _exchange(server.port, b"GET /health HTTP/1.1\nHost: x\nConnection: close\n\n")
    assert status == 200 and reply["status"] == "ok" and time.monotonic() - start < TIMEOUT / 2, reply


def test_a_10_mb_body_gets_its_413(server):
    """413 from the Content-Length before a byte of the body is read; the server then reads and discards what
    the client still sends (a lingering close): closing at once would reset the connection and the client would
    see 'connection reset' instead of the 413."""
    body = b'{"prompt": "' + b"x" * (10 << 20) + b'"}'
    status, _, reply = _post(server, body)
    assert status == 413 and "over the limit" in reply["error"]["message"], (status, reply)
    # curl's way: ask first (Expect: 100-continue); the 413 comes back and the body is never sent
    head = _request("POST", "/v1/completions", headers=["Expect: 100-continue"]).replace(
        b"Content-Length: 0", f"Content-Length: {len(body)}".encode())
    start = time.monotonic()
    assert _exchange(server.port, head)[0] == 413 and time.monotonic() - start < TIMEOUT / 2
    # no Content-Length (chunked): 413 once the body read passes the limit
    chunk = b"x" * (256 << 10)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(8)) + b"0\r\n\r\n"
    head = _request("POST", "/v1/completions", headers=["Transfer-Encoding: chunked"]).replace(
        b"Content-Length: 0\r\n", b"")
    status, _, reply = _exchange(server.port, head + chunked)
    assert status == 413 and "over the limit" in reply["error"]["message"], (status, reply)
    assert server.complete(prompt="Four", max_tokens=2, temperature=0)["usage"]["completion_tokens"] == 2


def test_headers_over_the_limit_get_431(server):
    limit = Limits().max_header_bytes
    for size in (limit + 100, 20 * limit):   # arrives whole (checked on the complete head), or never completes
        status, _, reply = _exchange(server.port, _request("GET", "/health", headers=[f"X-Big: {'a' * size}"]))
        assert status == 431 and "limit" in reply["error"]["message"], (size, status, reply)


def test_expect_100_continue_is_answered(server):
    body = _completion()
    head = _request("POST", "/v1/completions", headers=["Expect: 100-continue"]).replace(
        b"Content-Length: 0", f"Content-Length: {len(body)}".encode())
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head)
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        assert _read_response(sock)[0] == 200


def test_slow_clients_get_408_without_blocking_others(server):
    """A client that sends its head, or its body, too slowly gets 408 and its connection closed after
    TIMEOUT s; meanwhile other clients are served at once (the timeouts are timers on the event loop)."""
    results = {}

    def slow(name, data):
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(data)   # ... and nothing more
            status, _, reply, _ = _read_response(sock)
            closed = sock.recv(1) == b""
        results[name] = status, reply, closed, time.monotonic() - start, time.monotonic()

    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
    threads = [threading.Thread(target=slow, args=("head", head)),
               threading.Thread(target=slow, args=("body", head + b"Content-Length: 100\r\n\r\n{\"prompt\"")),
               threading.Thread(target=slow, args=("body-chunked", head + b"Transfer-Encoding: chunked\r\n\r\n5\r\n"))]
    for t in threads:
        t.start()
    time.sleep(0.2)   # not synchronisation: the slow clients only need to have connected by now, and if they
    # have not, the check below still holds (it asserts the others are served while they wait)
    assert server.complete(prompt="Four", max_tokens=2, temperature=0)["usage"]["completion_tokens"] == 2
    assert server.get("/health")["status"] == "ok"
    served = time.monotonic()
    for t in threads:
        t.join(30)
    for name in ("head", "body", "body-chunked"):
        status, reply, closed, took, answered = results[name]
        assert status == 408 and "within" in reply["error"]["message"] and closed, (name, results[name])
        assert TIMEOUT * 0.9 < took < TIMEOUT + 5, (name, took)
        assert served < answered, f"the other client was served only after the slow {name} client's 408"


def test_api_key(server):
    """As vLLM's --api-key: every /v1 path needs 'Authorization: Bearer <key>' (the scheme in any case, as
    RFC 9110 11.1 says); 401 otherwise, with WWW-Authenticate. /health, /metrics and /replicas stay open."""
    body = _completion()
    for key, words in ((None, "needs an API key"), ("wrong", "wrong API key"), (KEY[:-1], "wrong API key"),
                       (KEY.upper(), "wrong API key")):
        status, headers, reply = _post(server, body, key=key)
        assert status == 401 and words in reply["error"]["message"], (key, status, reply)
        assert reply["error"]["type"] == "authentication_error" and headers.get("www-authenticate") == "Bearer"
    assert _post(server, body)[0] == 200
    for scheme in ("bearer", "BEARER"):
        status, _, reply = _post(server, body, key=None, headers=[f"Authorization: {scheme} {KEY}"])
        assert status == 200, (scheme, status, reply)
    assert _exchange(server.port, _request("GET", "/v1/models", key=None))[0] == 401
    for path in ("/health", "/metrics", "/replicas"):
        assert _exchange(server.port, _request("GET", path, key=None))[0] == 200, path
    # an unauthorised large request is refused before its body is read, and still answered cleanly
    big = b'{"prompt": "' + b"x" * (2 << 20) + b'"}'
    assert _post(server, big, key=None)[0] in (401, 413)


def test_head_405_and_keep_alive(server):
    """HEAD answers a GET endpoint's headers without a body; a wrong method gets 405 with Allow; two requests
    (and a HEAD between) on one connection; an idle kept-alive connection is closed after its timeout."""
    status, headers, body = _exchange(server.port, _request("HEAD", "/health"))
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0, (status, headers, body)
    status, headers, reply = _exchange(server.port, _request("DELETE", "/health"))
    assert status == 405 and headers.get("allow") == "GET, HEAD" and "DELETE" in reply["error"]["message"]
    status, headers, _ = _exchange(server.port, _request("GET", "/v1/completions"))
    assert status == 405 and headers.get("allow") == "POST", (status, headers)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(_request("POST", "/v1/completions", _completion(), close=False))
        status, headers, first, rest = _read_response(sock)
        assert status == 200 and headers.get("connection", "keep-alive") != "close" and not rest
        sock.sendall(_request("HEAD", "/health", close=False))
        status, _, body, rest = _read_response(sock, head_request=True)
        assert status == 200 and body == b"" and not rest
        sock.sendall(_request("POST", "/v1/completions", _completion(), close=False))
        status, _, second, _ = _read_response(sock)
        assert status == 200 and second["choices"][0]["text"] == first["choices"][0]["text"]
        assert second["id"] != first["id"]
        start = time.monotonic()
        assert sock.recv(1) == b"" and time.monotonic() - start < TIMEOUT + 5   # the keep-alive timeout


def test_a_half_closed_client_gets_its_answer(server):
    """A client may shutdown(SHUT_WR) once its request is sent (curl, `nc -N`): that is not a disconnect."""
    for max_tokens in (2, 60):   # answered before the server sees the FIN, and after it
        status, _, reply = _exchange(server.port, _request("POST", "/v1/completions", _completion(max_tokens)),
                                     half_close=True)
        assert status == 200 and reply["usage"]["completion_tokens"] == max_tokens, reply


def test_a_cancelled_request_counts_until_its_replica_lets_go(server):
    """A client that closes its socket while its completion is computed cancels it. Its FIN looks the same as a
    half-close (above), so the server probes with an interim 100 Continue: a closed socket answers with a reset,
    and the disconnect is counted. The replica holds the request until it reads the cancel; a stopped one never
    does, and its outstanding count must not drop (it used to, so least-outstanding balancing preferred the one
    replica that answers nothing). SIGCONT: it acknowledges, the count drops to 0 (the request is freed)."""
    server.wait_ready(timeout=60)
    stopped = server.replicas()[0]["pid"]
    os.kill(stopped, signal.SIGSTOP)
    try:
        before = value(parse(server.get("/metrics")), "serving_client_disconnects_total")
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(_request("POST", "/v1/completions", _completion(200)))
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


def test_idle_sockets_cannot_lock_clients_out(server):
    """The issue: ~250 idle sockets from one user blocked new clients, and accept errors wrote 34 MB of log in
    two minutes. With 10x the cap held open (connected, or half a request head sent), a new client is answered at
    once, the server closes idle connections to stay near its cap (each holds a file descriptor) well before their
    head timeout, and the log stays small."""
    log_before = os.path.getsize(server.log_path)
    held = []
    try:
        for i in range(10 * CAP):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            if i % 2:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")   # a head never finished
            held.append(sock)
        for _ in range(3):
            start = time.monotonic()
            status, _, reply = _exchange(server.port, _request("GET", "/health"), timeout=TIMEOUT)
            assert status == 200 and time.monotonic() - start < 1.0, (status, reply)
        assert server.complete(prompt="Four", max_tokens=2, temperature=0)["usage"]["completion_tokens"] == 2
        # the clients that sent half a head: closed without a word (evicted), or answered 408 at their timeout
        evicted, timed_out, waiting = 0, 0, held[1::2]
        while evicted < len(held) // 2 - CAP - 16 and waiting:
            for sock in select.select(waiting, [], [], 0.05)[0]:
                try:
                    data = sock.recv(64)
                except ConnectionResetError:
                    data = b""
                evicted, timed_out = evicted + (data == b""), timed_out + data.startswith(b"HTTP/1.1 408")
                waiting.remove(sock)
        assert evicted >= len(held) // 2 - CAP - 16, f"{evicted} idle connections closed, {timed_out} timed out"
    finally:
        for sock in held:
            sock.close()
    grown = os.path.getsize(server.log_path) - log_before
    assert grown < 4096, f"the log grew by {grown} bytes:\n{open(server.log_path).read()[-2000:]}"


def test_a_flood_of_bad_requests_leaves_the_log_small(server):
    """Every malformed request makes uvicorn log a warning: 300 of them (0.1 s of one client's work) write one
    line, whose next occurrence will say how many were left out (limits.RateLimitFilter)."""
    log_before = os.path.getsize(server.log_path)
    for _ in range(300):
        assert _exchange(server.port, b"GARBAGE\r\n\r\n")[0] == 400
    grown = os.path.getsize(server.log_path) - log_before
    assert grown < 1024, f"the log grew by {grown} bytes:\n{open(server.log_path).read()[-2000:]}"


def test_rate_limit_filter():
    now = [0.0]
    limiter = RateLimitFilter(interval=10.0, clock=lambda: now[0])
    logger = logging.getLogger("test_serving_http.flood")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    logger.addFilter(limiter)
    logger.propagate = False
    try:
        for i in range(1000):
            logger.error("socket.accept() out of system resource\nsocket: <fd=%d>", i)
            now[0] += 0.125   # 1000 messages in 125 s: one per 10 s passes
        logger.warning("another kind")
        assert len(records) == 13 + 1, [r.getMessage() for r in records]
        assert records[0].getMessage().startswith("socket.accept() out of system resource")
        assert "79 more like this in the last 10 s not logged" in records[1].getMessage(), records[1].getMessage()
        assert records[-1].getMessage() == "another kind"
    finally:
        logger.removeHandler(handler)
        logger.removeFilter(limiter)


def test_requests_over_the_cap_get_a_quick_503(server):
    """More requests in flight than the cap (the replica stopped, so none can finish): the ones over it get 503
    with Retry-After at once, none hangs; once the replica resumes the others are answered."""
    server.wait_ready(timeout=60)
    stopped = server.replicas()[0]["pid"]
    socks, refused = [], {}
    os.kill(stopped, signal.SIGSTOP)
    try:
        for _ in range(CAP + 8):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
            sock.sendall(_request("POST", "/v1/completions", _completion(4)))
            socks.append(sock)
        deadline = time.monotonic() + 10
        while len(refused) < 8 and time.monotonic() < deadline:
            readable, _, _ = select.select([s for s in socks if s not in refused], [], [], 0.05)
            for sock in readable:
                refused[sock] = _read_response(sock)
        health = server.get("/health")   # while the cap is reached: GETs compute nothing, they are not refused
    finally:
        os.kill(stopped, signal.SIGCONT)
    try:
        assert len(refused) == 8, [r[:3] for r in refused.values()]
        assert health["status"] == "ok", health
        for status, headers, reply, _ in refused.values():
            assert status == 503 and headers.get("retry-after") == "1", (status, headers, reply)
            assert reply["error"]["type"] == "server_error" and "limit" in reply["error"]["message"], reply
        assert [_read_response(s)[0] for s in socks if s not in refused] == [200] * CAP
    finally:
        for sock in socks:
            sock.close()


def test_completion_ids_are_unique_across_restarts(server):
    """cmpl-<uuid4 hex>, as vLLM's random_uuid: the old server counted from cmpl-0 at every start."""
    first = {server.complete(prompt="Four", max_tokens=1, temperature=0)["id"] for _ in range(3)}
    with start_server(replicas=1, max_batch=8, api_key=KEY, env={"COURSE_IMPL": "solutions"}) as other:
        second = {other.complete(prompt="Four", max_tokens=1, temperature=0)["id"] for _ in range(3)}
    assert len(first | second) == 6, (first, second)
    assert all(i.startswith("cmpl-") and len(i) == len("cmpl-") + 32 for i in first | second), first | second


def test_loopback_only(server):
    """The server binds loopback only: any other address is refused before a process starts, and the running
    server is not reachable on this machine's other addresses."""
    for host in ("0.0.0.0", "::", "192.168.1.10"):
        with pytest.raises(ValueError, match="loopback"):
            start_server(host=host)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))   # no packet is sent: it only picks the outgoing interface
            address = probe.getsockname()[0]
        except OSError:
            address = "127.0.0.1"
    if address.startswith("127."):
        pytest.skip("this machine has no address but loopback")
    with pytest.raises(OSError):
        socket.create_connection((address, server.port), timeout=5).close()
