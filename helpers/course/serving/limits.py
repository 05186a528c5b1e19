"""The front end's limits: what keeps one client (or a thousand sockets) from hurting the others. The HTTP parsing
itself is h11's (a well-kept HTTP/1.1 state machine, uvicorn's pure-Python protocol); this module adds what
uvicorn leaves out or leaves open, and what the course's old hand-written server had (issue 20).

API (helpers/course/serving/__main__.py uses it):

    server = make_server(app, sock)          # a uvicorn.Server for the FastAPI app on a bound listening socket;
    task = asyncio.create_task(server.serve())   # it wraps app in LimitsMiddleware (do not add it again)
    await server.wait_started()              # listening: report the port now
    server.should_exit = True; await task    # stop (it installs no signal handlers: the caller owns them)

    make_server(app, sock, limits=Limits(max_connections=64), log_level="info", **other uvicorn.Config options)
    Limits()                                 # the numbers below; Limits.from_env(): $SERVING_LIMITS overrides
    LimitsMiddleware(app, limits)            # the pure ASGI middleware alone (tests, or another server)
    RateLimitFilter(interval=10.0)           # a logging.Filter: one message per interval, with a suppressed count
    error_body(status, message, param=None)  # the OpenAI error object of the answers given here (JSON bytes)

What each part does, and why:

- LimitsMiddleware (pure ASGI, not Starlette's BaseHTTPMiddleware, which would buffer a streamed response):
  a request body over `max_body` bytes gets 413 from its Content-Length before a byte of it is read (curl's
  `Expect: 100-continue` then never sends it), or as soon as a body without one (chunked) passes the limit; a
  body that has not fully arrived `body_timeout` seconds after its head gets 408; headers (and the request
  target) over `max_header_bytes` get 431. It reads the body (at most 1 MiB) before the app runs and hands it
  on whole. Over `max_concurrent_requests` POSTs in flight it answers 503 (GETs, which compute nothing, pass).
  HEAD is served as GET (uvicorn sends the headers, drops the body), and a 405's `Allow` names HEAD wherever it
  names GET. Its answers are OpenAI error objects, with `Connection: close`.
- CourseH11Protocol, uvicorn's h11 protocol (uvicorn/protocols/http/h11_impl.py, read for this) plus:
  * a head timeout: uvicorn arms its keep-alive timer only after a response, so a socket that connects and
    sends nothing, or a request head one byte a second (slowloris), held a connection for ever. A head not
    complete `header_timeout` seconds after its first byte (or after the connection opened) is answered 408
    and closed; a connection that sent nothing is closed quietly, as an idle keep-alive one is. Timers on the
    event loop: a slow client blocks nobody.
  * a connection cap: uvicorn's limit_concurrency answers 503 to a *request* once connections or tasks reach
    it, but it accepts every connection, so ~250 idle sockets of one user meant 503 (or, on the old server,
    EMFILE) for everyone. Here a new connection over `max_connections` closes idle ones (no request in
    flight and nothing unread in the kernel): lingering ones first, then the longest idle, as nginx reuses its
    idle keep-alive connections when it runs out. If none is idle the newcomer stays (its request is served,
    or gets the middleware's quick 503 when `max_concurrent_requests` POSTs are in flight); past a hard margin
    one that has sent nothing within 0.1 s is reset. A client never hangs. (uvicorn's own limit_concurrency
    is off: it counted idle connections too.)
  * half-close: asyncio closes a transport whose protocol's eof_received returns None, as uvicorn's does, so
    a client that sent its request and then shutdown(SHUT_WR) was treated as gone and got no answer (`nc -N`
    does this, as may any client done sending). Here a complete request goes on and is answered. Whether
    such a client is still there cannot be seen from its FIN (close() and shutdown(SHUT_WR) send the same),
    so the server sends one interim `100 Continue` (HTTP/1.1 clients must accept 1xx responses, RFC 9110
    15.2): a socket that is really closed answers it with a reset, which SO_ERROR shows; then the request is
    cancelled as for any disconnect. (An HTTP/1.0 client gets no 1xx: its request runs to the end.)
  * lingering close (as nginx and Apache; the old server did it too): an answer sent before the request was
    read whole (413, 408, 431, a protocol error) is followed by shutdown(SHUT_WR) and reading and discarding
    what the client still sends, for at most `linger_seconds` / `linger_bytes`. Closing at once with unread
    data makes the kernel send a reset, which can reach the client before the answer.
  * a malformed request gets h11's words for what is wrong ("illegal request line", "bad Content-Length",
    "Missing mandatory Host: header") and h11's status (400, or 431 for an endless head) as an OpenAI error
    object, not uvicorn's plain "Invalid HTTP request received.".
- RateLimitFilter on the loggers `uvicorn.error` and `asyncio`: the old server wrote 34 MB of asyncio accept
  errors in two minutes. One message of a kind per `log_interval` seconds passes, the next one says how
  many were left out. (uvicorn's access log is off, as the old server had none.)

vLLM does the same job in vllm/entrypoints/launchers/launcher.py (serve_http: uvicorn.Config with
h11_max_incomplete_event_size and h11_max_header_count, a NoSignalServer that leaves signals to its caller)
and vllm/envs.py (VLLM_HTTP_TIMEOUT_KEEP_ALIVE = 5 s, the keep-alive used here); it raises the file limit
instead of capping connections (vllm/utils/system_utils.py set_ulimit).
"""
from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import http
import json
import logging
import os
import resource
import socket
import struct
import termios
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from helpers.course.serving import protocol

LIMITS_ENV = "SERVING_LIMITS"


def default_max_connections() -> int:
    """Half the file descriptors left after 64 for the server's own pipes and replicas, at most 1024: under
    `ulimit -n 256` that is 96, so connections can never take the descriptors a replica's respawn needs."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(8, min(1024, (soft - 64) // 2))


@dataclasses.dataclass(frozen=True)
class Limits:
    max_body: int = 1 << 20             # bytes of request body (a completion request is a few hundred)
    max_header_bytes: int = 16 << 10    # request target + headers (h11's default incomplete-event limit)
    header_timeout: float = 10.0        # seconds for a request head, from its first byte or the connection's start
    body_timeout: float = 10.0          # seconds for the body, once the head is in
    keep_alive_timeout: float = 5.0     # seconds an idle keep-alive connection stays open (vLLM's default)
    max_connections: int = dataclasses.field(default_factory=default_max_connections)
    max_concurrent_requests: int | None = None   # requests in flight before 503 (None: max_connections)
    linger_seconds: float = 5.0         # lingering close: how long to discard what a client still sends ...
    linger_bytes: int = 64 << 20        # ... and how much of it at most
    log_interval: float = 10.0          # seconds between two log messages of one kind
    probe_interval: float = 0.5         # seconds between checks that a half-closed client is still there

    @classmethod
    def from_env(cls, **overrides) -> "Limits":
        """Limits() with the fields named in $SERVING_LIMITS ("max_connections=16,header_timeout=2": tests use
        a small cap and short timeouts), then `overrides`."""
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        from_env = {}
        for item in filter(None, os.environ.get(LIMITS_ENV, "").split(",")):
            name, _, value = item.partition("=")
            name = name.strip()
            if name not in fields:
                raise ValueError(f"${LIMITS_ENV}: no limit {name!r}; the limits are {', '.join(fields)}")
            from_env[name] = float(value) if "float" in str(fields[name]) else int(value)
        return cls(**{**from_env, **overrides})


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    """The OpenAI error object, {"error": {"message", "type", "param", "code"}} (protocol.py's), as JSON bytes."""
    return json.dumps(protocol.error_body(message, status, param)).encode()


def _raw_response(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 error response, for the answers given below the ASGI app (no h11 state to follow)."""
    body = error_body(status, message)
    return (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class LimitsMiddleware:
    """Body size (413) and time (408) limits, header size (431), HEAD as GET, HEAD in a 405's Allow."""

    def __init__(self, app, limits: Limits | None = None):
        self.app, self.limits = app, limits or Limits()
        self.in_flight = 0
        self.max_in_flight = self.limits.max_concurrent_requests or self.limits.max_connections

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] != "POST":   # GETs compute nothing: /health and /metrics answer under any load
            return await self._limited(scope, receive, send)
        if self.in_flight >= self.max_in_flight:
            logging.getLogger("uvicorn.error").warning("503: %d requests in flight, the limit", self.in_flight)
            return await _answer(send, 503, f"the server is at its limit of {self.max_in_flight} requests in "
                                            "flight: try again shortly", retry_after=1)
        self.in_flight += 1
        try:
            await self._limited(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _limited(self, scope, receive, send):
        limits = self.limits
        head_size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + \
            sum(len(name) + len(value) + 4 for name, value in scope["headers"])
        if head_size > limits.max_header_bytes:
            return await _answer(send, 431, f"the request's headers take {head_size} bytes, over the limit of "
                                            f"{limits.max_header_bytes} bytes")
        if scope["method"] == "HEAD":
            scope = dict(scope, method="GET")   # the server sees the original scope: it sends no body for HEAD
        declared = next((value for name, value in scope["headers"] if name == b"content-length"), None)
        if declared is not None and int(declared) > limits.max_body:   # h11 let only digits through
            return await _answer(send, 413, f"the request body of {declared[:20].decode()} bytes is over the "
                                            f"limit of {limits.max_body} bytes")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(limits.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return   # the client left before its request was complete: nothing to answer
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > limits.max_body:
                        return await _answer(send, 413, f"the request body is over the limit of {limits.max_body} "
                                                        "bytes")
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            return await _answer(send, 408, f"the request body did not arrive within {limits.body_timeout:g} s "
                                            f"({size} bytes came)")
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            # the body once, then the server's own receive (which reports the client's disconnect)
            return pending.pop() if pending else await receive()

        async def send_allow_head(message):
            if message["type"] == "http.response.start" and message["status"] == 405:
                headers = []
                for name, value in message.get("headers", []):
                    methods = [m.strip() for m in value.split(b",")]
                    if name.lower() == b"allow" and b"GET" in methods and b"HEAD" not in methods:
                        value = value + b", HEAD"
                    headers.append((name, value))
                message = dict(message, headers=headers)
            await send(message)

        await self.app(scope, replay, send_allow_head)


async def _answer(send, status: int, message: str, retry_after: int | None = None) -> None:
    body = error_body(status, message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Connection(h11.Connection):
    """h11's connection, remembering the protocol error it raised (uvicorn catches it and keeps only a 400)."""
    last_error: h11.RemoteProtocolError | None = None

    def next_event(self):
        try:
            return super().next_event()
        except h11.RemoteProtocolError as e:
            self.last_error = e
            raise


class _Transport:
    """The connection's transport as uvicorn sees it: close() goes through the protocol (a lingering close
    where the client may still be sending); everything else is the asyncio transport's."""

    def __init__(self, transport, protocol):
        self._transport, self._protocol = transport, protocol

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def close(self):
        self._protocol._close()


class CourseH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a head timeout, a connection cap, half-close and lingering close."""

    def __init__(self, config, server_state, app_state, _loop=None):
        super().__init__(config, server_state, app_state, _loop)
        self.limits: Limits = getattr(config, "course_limits", None) or Limits()
        self.conn = _Connection(h11.SERVER, self.limits.max_header_bytes)
        self._raw = None                      # the asyncio transport (self.transport is its _Transport)
        self._head_timer = self._linger_timer = self._probe_timer = self._cap_timer = None
        self._head_bytes = 0                  # bytes of the request head received so far
        self._lingering = self._closing_quietly = False
        self._lingered = 0
        self.opened = self.last_active = self.loop.time()
        self._answered = 0                    # responses completed on this connection

    # -- connection life -------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._raw, self.transport = transport, _Transport(transport, self)
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timeout)
        self._enforce_cap()

    def connection_lost(self, exc) -> None:
        for timer in (self._head_timer, self._linger_timer, self._probe_timer, self._cap_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def _busy(self) -> bool:
        """A request in flight: its head is in and its answer is not complete."""
        return self.cycle is not None and not self.cycle.response_complete and not self._lingering

    def _enforce_cap(self) -> None:
        """A new connection over the cap closes idle ones. If all are busy it stays (its request gets the
        middleware's quick 503), unless even the hard margin is passed: then, unless it has sent something
        within 0.1 s (when a burst has been read, idle connections can be told from busy ones), it is reset."""
        if self._make_room(self.limits.max_connections) > self._hard_cap():
            self._cap_timer = self.loop.call_later(0.1, self._refuse_if_over)

    def _hard_cap(self) -> int:
        return self.limits.max_connections + max(16, self.limits.max_connections // 4)

    def _refuse_if_over(self) -> None:
        self._cap_timer = None
        if self._closed() or self._busy() or self._head_bytes or self._answered:
            return
        if self._make_room(self.limits.max_connections) > self._hard_cap():
            self.logger.warning("connection refused: %d connections are open and busy (cap %d)",
                                len(self.connections) - 1, self.limits.max_connections)
            self._closing_quietly = True
            self._raw.abort()

    def _make_room(self, target: int) -> int:
        """Close idle connections until at most `target` are open: lingering ones first, then those idle
        longest (after an answer, or in the middle of a slow head), then those that never sent a byte, oldest
        first. Idle means no request in flight and nothing waiting unread in the kernel (FIONREAD): a client
        just accepted whose request we have not read yet is not idle. Returns how many stay open."""
        open_ = [c for c in self.connections if not isinstance(c, CourseH11Protocol) or not c._closed()]
        if len(open_) <= target:
            return len(open_)
        ranked = []
        for c in open_:
            if c is self or not isinstance(c, CourseH11Protocol):
                continue
            if c._lingering:
                ranked.append((0, c.last_active, id(c), c))
            elif c._busy() or c.conn.their_state is not h11.IDLE or c._unread():
                continue
            elif c._answered or c._head_bytes:
                ranked.append((1, c.last_active, id(c), c))
            else:
                ranked.append((2, c.opened, id(c), c))
        ranked.sort()
        for *_, victim in ranked[:len(open_) - target]:
            victim._evict()
        return len(open_) - min(len(ranked), len(open_) - target)

    def _unread(self) -> int:
        """Bytes the client sent that the kernel holds and the event loop has not read yet."""
        sock = self._raw.get_extra_info("socket")
        try:
            return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
        except (OSError, AttributeError, ValueError):
            return 0

    def _closed(self) -> bool:
        return self._raw is not None and self._raw.is_closing()

    def _evict(self) -> None:
        self._closing_quietly = True
        self.connections.discard(self)   # now, not when asyncio reports the loss: uvicorn's 503 test counts them
        if self._lingering:
            self._raw.abort()
        else:
            self._raw.close()

    def shutdown(self) -> None:
        self._closing_quietly = True   # the server stops: no lingering
        if self._lingering:
            self._raw.close()
        else:
            super().shutdown()

    # -- reading -----------------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.last_active = self.loop.time()
        if self._lingering:
            self._lingered += len(data)
            if self._lingered > self.limits.linger_bytes:
                self._raw.close()
            return
        if self.conn.their_state is h11.IDLE:
            if self._head_timer is None:   # the first byte of a new request on a kept-alive connection
                self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timeout)
            if self._head_bytes == 0 and len(self.connections) > self.limits.max_connections:
                self._make_room(self.limits.max_connections)   # a request begins: close idle ones read since
            self._head_bytes += len(data)
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self._head_timer is not None:
            self._head_timer.cancel()      # the head is complete (the body has its own timeout)
            self._head_timer, self._head_bytes = None, 0

    def on_response_complete(self) -> None:
        self.last_active = self.loop.time()
        self._answered += 1
        super().on_response_complete()

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._raw.is_closing() or self._lingering:
            return
        if self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE and not self._busy():
            if self._head_bytes:
                self.logger.info("closing a connection whose request head took over %gs",
                                 self.limits.header_timeout)
                self._raw.write(_raw_response(408, f"no complete request head within "
                                                   f"{self.limits.header_timeout:g} s"))
                self._close()
            else:
                self._closing_quietly = True
                self._raw.close()

    def eof_received(self):
        """The client closed its sending side. With a whole request in and its answer not sent, keep the
        connection open to answer it (a half-close); otherwise close, as uvicorn does."""
        cycle = self.cycle
        if self._lingering or cycle is None or cycle.response_complete or cycle.more_body or cycle.disconnected:
            return None
        cycle.keep_alive = False    # close once answered
        if not cycle.response_started and self.scope["http_version"] == "1.1":
            try:   # the probe: a socket that was really closed answers these bytes with a reset
                self._raw.write(self.conn.send(h11.InformationalResponse(status_code=100, headers=[],
                                                                         reason=b"Continue")))
                cycle.waiting_for_100_continue = False
            except h11.LocalProtocolError:
                pass
        self._probe_timer = self.loop.call_later(self.limits.probe_interval, self._probe)
        return True

    def _probe(self) -> None:
        self._probe_timer = None
        if self._raw.is_closing():
            return
        sock = self._raw.get_extra_info("socket")
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if sock is not None else 0
        if error:   # EPIPE/ECONNRESET: the client is gone; uvicorn's connection_lost tells the app
            self._closing_quietly = True
            self._raw.abort()
        elif self._busy():
            self._probe_timer = self.loop.call_later(self.limits.probe_interval, self._probe)

    # -- answering and closing ----------------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        error = self.conn.last_error
        status = getattr(error, "error_status_hint", 400) if error is not None else 400
        if status == 431:
            message = f"the request head is over the limit of {self.limits.max_header_bytes} bytes"
        else:
            message = f"malformed HTTP request: {str(error)[:200] if error is not None else msg}"
        self._raw.write(_raw_response(status, message))
        self._close()

    def _close(self) -> None:
        """Close, lingering if the client may still be sending what we did not read."""
        raw = self._raw
        if raw.is_closing() or self._lingering:
            return
        unread = self.conn.their_state in (h11.SEND_BODY, h11.ERROR) or \
            (self.conn.their_state is h11.IDLE and self._head_bytes > 0)
        if self._closing_quietly or not unread or not raw.can_write_eof():
            raw.close()
            return
        self._lingering = True
        for timer in (self._head_timer, self._probe_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._probe_timer = None
        raw.write_eof()        # the answer goes out, then our FIN
        raw.resume_reading()   # uvicorn may have paused reading (flow control)
        self._linger_timer = self.loop.call_later(self.limits.linger_seconds, raw.close)


class RateLimitFilter(logging.Filter):
    """Let one record of a kind (logger, level, first line of its message) through per `interval` seconds;
    the next one that passes says how many were dropped in between."""

    def __init__(self, interval: float = 10.0, clock=time.monotonic):
        super().__init__()
        self.interval, self.clock = interval, clock
        self._kinds: dict[tuple, list] = {}   # kind -> [time the next may pass, records dropped since]

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, record.levelno, str(record.msg).split("\n", 1)[0][:200])
        now = self.clock()
        state = self._kinds.get(kind)
        if state is not None and now < state[0]:
            state[1] += 1
            return False
        if len(self._kinds) > 1000:   # many kinds (messages that embed values): forget, stay bounded
            self._kinds.clear()
        dropped = state[1] if state is not None else 0
        self._kinds[kind] = [now + self.interval, 0]
        if dropped:
            record.msg = f"{record.msg} [{dropped} more like this in the last {self.interval:g} s not logged]"
        return True


class CourseServer(uvicorn.Server):
    """uvicorn's Server on a socket bound by the caller, without signal handlers of its own (the caller
    stops it with `should_exit = True`), as vLLM's NoSignalServer."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]):
        super().__init__(config)
        self.sockets = sockets

    def capture_signals(self):
        import contextlib
        return contextlib.nullcontext()

    async def serve(self, sockets=None) -> None:
        await super().serve(sockets=sockets or self.sockets)

    async def wait_started(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.started:
            if self.should_exit or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            await asyncio.sleep(0.01)


LOGGERS = ("uvicorn.error", "uvicorn", "asyncio")


def make_server(app, sock: socket.socket | None = None, *, limits: Limits | None = None, log_level: str = "info",
                **uvicorn_options) -> CourseServer:
    """A uvicorn server for `app` (wrapped in LimitsMiddleware) on the listening socket `sock`, with the
    course's protocol and limits. `uvicorn_options` go to uvicorn.Config (they override the ones set here)."""
    limits = limits or Limits.from_env()
    options = dict(http=CourseH11Protocol, log_level=log_level, access_log=False, server_header=False,
                   limit_concurrency=None, timeout_keep_alive=limits.keep_alive_timeout,
                   h11_max_incomplete_event_size=limits.max_header_bytes, timeout_graceful_shutdown=2)
    options.update(uvicorn_options)
    config = uvicorn.Config(LimitsMiddleware(app, limits), **options)
    config.course_limits = limits
    config.load()
    log_filter = RateLimitFilter(limits.log_interval)
    for name in LOGGERS:   # after uvicorn.Config, whose logging setup would not keep them otherwise
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, RateLimitFilter)]:
            logger.removeFilter(old)
        logger.addFilter(log_filter)
    return CourseServer(config, [sock] if sock is not None else None)
