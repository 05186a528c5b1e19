"""The HTTP front end: a small HTTP/1.1 server on asyncio streams (standard library only), in front of
the balancer. One request per connection (`Connection: close`), JSON in and out.

    POST /v1/completions   OpenAI-compatible completion (see protocol.py)
    GET  /v1/models        the model served and its context length
    GET  /health           200 when at least one replica is up, else 503
    GET  /metrics          Prometheus text format (see metrics.py)
    GET  /replicas         the course's window into the balancer: pid, state, load of every replica

Why HTTP and this API rather than the seed's gRPC `InferenceService.Predict`: the OpenAI completions API is
what vLLM, SGLang, TGI and llama.cpp's server all speak, so every client library, load tester and router a
learner will meet talks to it; a curl line is enough to try it. gRPC appears inside serving systems (e.g.
between a router and its engines, Triton's KServe protocol) where its binary framing pays off.

While a completion is computed the server keeps reading the client's socket: if the client disconnects,
the request is cancelled on its replica (no compute wasted) and the server carries on.

No request can take the server down: a malformed request gets a 4xx naming what is wrong; a request that
fails inside a replica gets that replica's answer (400, or 500 for a bug it hit) and the replica carries
on; any other exception is a 500 for that request alone. When the server answers before reading the whole
body (413, 401, a bad header), it reads and discards what the client is still sending before it closes
(a *lingering close*, as nginx and Apache do): closing a socket with unread data makes the kernel send a
reset, which can reach the client before the answer does.

API key (optional, as vLLM's `--api-key`): with one set, every path under /v1 needs the header
`Authorization: Bearer <key>`, else 401. /health, /metrics and /replicas stay open, as vLLM leaves its
non-/v1 paths open: probes and Prometheus scrapers carry no key, and they compute nothing.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time

from helpers.course.serving.balancer import NoReplicaError, RequestFailed
from helpers.course.serving.protocol import BadRequest, completion_body, decode_json, error_body, parse_completion

MAX_BODY = 1 << 20          # bytes; a completion request is a few hundred
HEADER_TIMEOUT = 10.0       # seconds a client gets to send its request
REQUEST_TIMEOUT = 120.0     # seconds before a completion is answered 504
LINGER_SECONDS = 10.0       # lingering close: how long to discard what a client still sends after our answer
LINGER_BYTES = 64 << 20     # ... and how much of it at most


ENDPOINTS = {"/v1/completions": "POST", "/v1/models": "GET", "/health": "GET", "/metrics": "GET",
             "/replicas": "GET"}


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 413: "Payload Too Large", 500: "Internal Server Error", 503: "Service Unavailable",
           504: "Gateway Timeout"}


async def read_request(reader: asyncio.StreamReader, writer=None, check=None) -> tuple[str, str, dict, bytes]:
    """Parse one HTTP/1.1 request: (method, path, headers with lower-case names, body). `check(method,
    path, headers)` runs before the body is read (the API key); an HttpError it raises is the answer."""
    method, path, headers, length = await read_head(reader)
    if check is not None:
        check(method, path, headers)
    if length > MAX_BODY:
        raise HttpError(413, f"request body of {headers['content-length'][:20]} bytes is over the limit of "
                             f"{MAX_BODY} bytes")
    if writer is not None and length and headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits for this before sending a large body
    try:
        body = await asyncio.wait_for(reader.readexactly(length), HEADER_TIMEOUT)
    except (asyncio.IncompleteReadError, asyncio.TimeoutError):
        raise HttpError(400, f"the body is shorter than Content-Length={length}") from None
    return method, path, headers, body


async def read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict, int]:
    """The request line and headers: (method, path, headers with lower-case names, Content-Length, which
    may be over MAX_BODY: the caller checks, after the API key)."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEADER_TIMEOUT)
    except asyncio.LimitOverrunError:
        raise HttpError(413, "request headers are too large") from None
    except asyncio.IncompleteReadError:
        raise ConnectionResetError("client closed the connection before sending a request") from None
    except asyncio.TimeoutError:
        raise HttpError(408, f"no complete request within {HEADER_TIMEOUT:g} s") from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, f"malformed request line {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise HttpError(400, f"malformed header line {line[:80]!r}")
            name, value = name.strip().lower(), value.strip()
            if name == "content-length" and headers.get(name, value) != value:
                raise HttpError(400, f"two different Content-Length headers ({headers[name][:20]!r}, "
                                     f"{value[:20]!r}): send one")
            headers[name] = value
    if "transfer-encoding" in headers:
        raise HttpError(400, "Transfer-Encoding (chunked request bodies) is not supported: send Content-Length")
    declared = headers.get("content-length", "0")
    # int() would also take "-5", "+5", " 5" and "1_000"; HTTP allows only digits (RFC 9110, 8.6)
    if not (declared.isascii() and declared.isdigit()):
        raise HttpError(400, f"Content-Length must be a whole number of bytes (digits only), got {declared[:20]!r}")
    length = int(declared) if len(declared) <= 18 else MAX_BODY + 1
    return parts[0], parts[1].split("?")[0], headers, length


def write_response(writer, status: int, payload, content_type="application/json", extra_headers=None):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}", f"Content-Type: {content_type}",
            f"Content-Length: {len(data)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (extra_headers or {}).items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)


async def lingering_close(reader, writer) -> None:
    """Close after answering a request whose body we did not read: shut our sending side (the client sees
    the end of our answer), discard what it still sends until it closes, for at most LINGER_SECONDS and
    LINGER_BYTES, then close. Closing at once would reset the connection and could lose the answer."""
    try:
        if writer.can_write_eof():
            writer.write_eof()
        loop = asyncio.get_running_loop()
        deadline, discarded = loop.time() + LINGER_SECONDS, 0
        while discarded < LINGER_BYTES and loop.time() < deadline:
            chunk = await asyncio.wait_for(reader.read(1 << 16), deadline - loop.time())
            if not chunk:
                break
            discarded += len(chunk)
    except (OSError, RuntimeError, asyncio.TimeoutError):
        pass


class CompletionServer:
    def __init__(self, balancer, metrics, model_module, model_name: str, api_key: str | None = None):
        self.balancer, self.metrics, self.model_name = balancer, metrics, model_name
        self.api_key = api_key
        self.encode, self.decode = model_module.encode, model_module.decode
        config = model_module.CONFIG
        self.max_model_len, self.vocab_size = config.max_position_embeddings, config.vocab_size
        self.connections = set()

    async def handle(self, reader, writer) -> None:
        task = asyncio.current_task()
        self.connections.add(task)
        status, path = 500, "?"
        body = None   # stays None while the request's body is unread
        try:
            try:
                method, target, headers, body = await read_request(reader, writer, self.authorize)
                path = target if target in ENDPOINTS else "other"
                status = await self.route(method, target, body, reader, writer)
            except HttpError as e:
                status = e.status
                write_response(writer, e.status, error_body(e.message, e.status), extra_headers=e.headers)
            except BadRequest as e:
                status = e.status
                write_response(writer, e.status, error_body(e.message, e.status, e.param))
            if status is not None:
                self.metrics.requests.labels(endpoint=path, status=status).inc()
                await writer.drain()
            if body is None:
                await lingering_close(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client left; nothing to answer
        except Exception as e:  # a bug: answer 500 and keep serving
            try:
                write_response(writer, 500, error_body(f"internal error: {type(e).__name__}: {str(e)[:300]}", 500))
                self.metrics.requests.labels(endpoint=path, status=500).inc()
                await writer.drain()
            except Exception:
                pass
        finally:
            self.connections.discard(task)
            writer.close()

    def authorize(self, method, path, headers) -> None:
        """With an API key set, every /v1 path needs `Authorization: Bearer <key>` (as vLLM's --api-key)."""
        if self.api_key is None or not path.startswith("/v1"):
            return
        given = headers.get("authorization", "")
        expected = "Bearer " + self.api_key
        # compare_digest: the time taken does not tell how much of a guessed key was right
        if not hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8", "replace")):
            message = ("wrong API key" if given else "this server needs an API key") + \
                ": send the header 'Authorization: Bearer <key>'"
            raise HttpError(401, message, headers={"WWW-Authenticate": "Bearer"})

    async def route(self, method, path, body, reader, writer):
        """Answers the request; returns its status, or None when the client disconnected."""
        endpoints = ENDPOINTS
        if path not in endpoints:
            raise HttpError(404, f"no endpoint {path}; try POST /v1/completions or GET /health")
        if method != endpoints[path]:
            raise HttpError(405, f"{path} takes {endpoints[path]}, not {method}")
        if path == "/v1/completions":
            return await self.complete(body, reader, writer)
        if path == "/metrics":
            write_response(writer, 200, self.metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/health":
            up = sum(r.state == "ready" for r in self.balancer.replicas)
            write_response(writer, 200 if up else 503, {"status": "ok" if up else "no replica up",
                                                        "replicas_up": up, "replicas": len(self.balancer.replicas)})
            return 200 if up else 503
        elif path == "/v1/models":
            write_response(writer, 200, {"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                                     "max_model_len": self.max_model_len}]})
        else:
            write_response(writer, 200, {"policy": self.balancer.policy, "replicas": self.balancer.describe(),
                                         "backlog": len(self.balancer.backlog)})
        return 200

    async def complete(self, body: bytes, reader, writer):
        received = time.perf_counter()
        params = parse_completion(decode_json(body), model_name=self.model_name, max_model_len=self.max_model_len,
                                  vocab_size=self.vocab_size, encode=self.encode)
        if params["temperature"] > 0 and getattr(self.balancer, "pp", 1) > 1:
            raise BadRequest(f"this server's replicas are pipelines (pp={self.balancer.pp}) that decode greedily: "
                             "send 'temperature': 0", "temperature")
        rid, result = self.balancer.submit({k: params[k] for k in
                                            ("prompt", "max_tokens", "temperature", "top_p", "seed")})
        gone = asyncio.ensure_future(_client_gone(reader))
        try:
            done, _ = await asyncio.wait({result, gone}, timeout=REQUEST_TIMEOUT,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if result not in done:
            self.balancer.cancel(rid)
            if gone in done:
                self.metrics.disconnects.inc()
                return None
            raise HttpError(504, f"no replica answered within {REQUEST_TIMEOUT:g} s")
        try:
            out = result.result()
        except RequestFailed as e:  # this request failed on its replica (which carries on): not retried
            write_response(writer, e.status, error_body(e.message, e.status),
                           extra_headers={"X-Replica": e.replica})
            return e.status
        except NoReplicaError as e:
            write_response(writer, 503, error_body(str(e), 503))
            return 503
        self.metrics.latency.observe(time.perf_counter() - received)
        self.metrics.tokens.inc(len(out["tokens"]))
        write_response(writer, 200, completion_body(rid, self.model_name, params, out["tokens"], self.decode),
                       extra_headers={"X-Replica": out["replica"], "X-Retries": out["retries"]})
        return 200


async def _client_gone(reader) -> None:
    """Returns when the client closes its side of the connection (read gives b'' at end of file)."""
    while await reader.read(1024):
        pass  # ignore anything sent after the request (no pipelining here)
