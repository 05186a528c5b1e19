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
"""
from __future__ import annotations

import asyncio
import json
import time

from helpers.serving.protocol import BadRequest, completion_body, error_body, parse_completion

MAX_BODY = 1 << 20          # bytes; a completion request is a few hundred
HEADER_TIMEOUT = 10.0       # seconds a client gets to send its request
REQUEST_TIMEOUT = 120.0     # seconds before a completion is answered 504


ENDPOINTS = {"/v1/completions": "POST", "/v1/models": "GET", "/health": "GET", "/metrics": "GET",
             "/replicas": "GET"}


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
           413: "Payload Too Large", 500: "Internal Server Error", 503: "Service Unavailable",
           504: "Gateway Timeout"}


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict, bytes]:
    """Parse one HTTP/1.1 request: (method, path, headers with lower-case names, body)."""
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
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise HttpError(400, "chunked request bodies are not supported: send Content-Length")
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        raise HttpError(400, "Content-Length must be a whole number") from None
    if length < 0 or length > MAX_BODY:
        raise HttpError(413, f"request body of {length} bytes is over the limit of {MAX_BODY} bytes")
    try:
        body = await asyncio.wait_for(reader.readexactly(length), HEADER_TIMEOUT)
    except (asyncio.IncompleteReadError, asyncio.TimeoutError):
        raise HttpError(400, f"the body is shorter than Content-Length={length}") from None
    return parts[0], parts[1].split("?")[0], headers, body


def write_response(writer, status: int, payload, content_type="application/json", extra_headers=None):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}", f"Content-Type: {content_type}",
            f"Content-Length: {len(data)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (extra_headers or {}).items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)


class CompletionServer:
    def __init__(self, balancer, metrics, model_module, model_name: str):
        self.balancer, self.metrics, self.model_name = balancer, metrics, model_name
        self.encode, self.decode = model_module.encode, model_module.decode
        config = model_module.CONFIG
        self.max_model_len, self.vocab_size = config.max_position_embeddings, config.vocab_size
        self.connections = set()

    async def handle(self, reader, writer) -> None:
        task = asyncio.current_task()
        self.connections.add(task)
        status, path = 500, "?"
        try:
            try:
                method, target, headers, body = await read_request(reader)
                path = target if target in ENDPOINTS else "other"
                status = await self.route(method, target, body, reader, writer)
            except HttpError as e:
                status = e.status
                write_response(writer, e.status, error_body(e.message, e.status))
            except BadRequest as e:
                status = e.status
                write_response(writer, e.status, error_body(e.message, e.status, e.param))
            if status is not None:
                self.metrics.requests.labels(endpoint=path, status=status).inc()
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client left; nothing to answer
        except Exception as e:  # a bug: answer 500 and keep serving
            try:
                write_response(writer, 500, error_body(f"internal error: {type(e).__name__}: {e}", 500))
                self.metrics.requests.labels(endpoint=path, status=500).inc()
                await writer.drain()
            except Exception:
                pass
        finally:
            self.connections.discard(task)
            writer.close()

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
        try:
            decoded = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON: {e}") from None
        params = parse_completion(decoded, model_name=self.model_name, max_model_len=self.max_model_len,
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
        except Exception as e:
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
