"""Start the course's inference server on loopback:

    python -m helpers.course.serving --replicas 2 --batching continuous --policy least_outstanding --port 8000
    python -m helpers.course.serving --replicas 1 --pp 2 --tp 2      # one replica: 2 pipeline stages × 2 TP ranks
    python -m helpers.course.serving --kv-cache paged --enable-prefix-caching --max-num-batched-tokens 64
                                              # chapter 7's paged KV cache, prefix caching and chunked prefill
    python -m helpers.course.serving --replicas 4 --kv-cache paged --enable-prefix-caching --num-blocks 24 \
        --kv-events-config '{"enable_kv_cache_events": true, "endpoint": "tcp://*:5557"}' --routing kv_aware
                                              # chapter 9: replicas publish KV events over ZeroMQ (ports 5557-5560),
                                              # the Router places each request where its prefix is cached
    python -m helpers.course.serving --help   # every option: ServeConfig's fields (config.py), vLLM's names
    curl -s 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "It was the best of times", "max_tokens": 24, "temperature": 0}'
    curl -sN 127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 24, "stream": true, "stop": "\\n<|"}'
    curl -s 127.0.0.1:8000/metrics

Ctrl-C (or SIGTERM) stops the front end and every replica process.

On a machine shared by several users, anyone there can reach 127.0.0.1. Require a key, as vLLM does:
    SERVING_API_KEY=$(python -c 'import secrets; print(secrets.token_urlsafe())') python -m helpers.course.serving
    curl -s 127.0.0.1:8000/v1/completions -H "Authorization: Bearer $SERVING_API_KEY" ...
(--api-key KEY works too, but a command line is visible to every user in `ps`; the variable is not.)
"""
from __future__ import annotations

import asyncio
import signal
import socket
import sys

from helpers.course.serving.background import report_port
from helpers.course.serving.balancer import Balancer
from helpers.course.serving.config import ServeConfig
from helpers.course.serving.limits import make_server
from helpers.course.serving.metrics import ServingMetrics
from helpers.course.serving.replica import load_model_module
from helpers.course.serving.server import build_app


def parse_args(argv=None) -> ServeConfig:
    """The command line (generated from ServeConfig's fields; --help lists them) as a checked ServeConfig."""
    return ServeConfig.from_argv(argv, description=__doc__)


async def serve(config: ServeConfig) -> None:
    """The front end: the balancer (which starts the replicas) and the FastAPI app (server.py) on uvicorn, on one
    event loop, until SIGTERM or Ctrl-C. The socket is bound first, so that port 0 gives a free port to report;
    uvicorn serves on it with the course's limits (limits.py), as vLLM's serve_http runs its NoSignalServer on a
    socket bound before the engine starts (vllm/entrypoints/launchers/launcher.py)."""
    module = load_model_module(config.model)
    config.check_model(module.CONFIG)
    metrics = ServingMetrics()
    family = socket.AF_INET6 if config.host == "::1" else socket.AF_INET
    sock = socket.create_server((config.host, config.port), family=family, backlog=512)
    balancer = Balancer(config, metrics)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # A write to a client that has gone (a stream it left) must fail with EPIPE, not kill the server: Python
    # ignores SIGPIPE from its start, but a process forked by the launcher (launcher.py) has the default back.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    http = None
    try:
        await balancer.start()
        app = build_app(balancer, metrics, module, config.served_model_name, api_key=config.api_key)
        server = make_server(app, sock, log_level="warning")
        http = asyncio.ensure_future(server.serve())
        await server.wait_started()
        port = sock.getsockname()[1]
        host = "[::1]" if config.host == "::1" else config.host
        print(f"serving {config.served_model_name} on http://{host}:{port} with {config.summary()}", flush=True)
        report_port(port)   # to start_server, through its pipe
        await asyncio.wait({http, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        # As vLLM's serve_http: the engine first (requests in flight end with "the server is shutting down", so
        # open streams finish with an error event), then the HTTP server closes its connections.
        await balancer.stop()
        server.should_exit = True
        await http
    finally:
        if http is not None and not http.done():
            http.cancel()
        if not balancer.stopping:
            await balancer.stop()
        sock.close()


def main(argv=None):
    asyncio.run(serve(parse_args(argv)))
    print("server stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
