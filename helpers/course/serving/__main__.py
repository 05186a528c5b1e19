"""Start the course's inference server on loopback:

    python -m helpers.course.serving --replicas 2 --batching continuous --policy least_outstanding --port 8000
    python -m helpers.course.serving --replicas 1 --pp 2 --tp 2      # one replica: 2 pipeline stages × 2 TP ranks
    python -m helpers.course.serving --kv-cache paged --enable-prefix-caching --max-num-batched-tokens 64
                                              # chapter 7's paged KV cache, prefix caching and chunked prefill
    python -m helpers.course.serving --help   # every option: ServeConfig's fields (config.py), vLLM's names
    curl -s 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "It was the best of times", "max_tokens": 24, "temperature": 0}'
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
from helpers.course.serving.metrics import ServingMetrics
from helpers.course.serving.replica import load_model_module
from helpers.course.serving.server import CompletionServer


def parse_args(argv=None) -> ServeConfig:
    """The command line (generated from ServeConfig's fields; --help lists them) as a checked ServeConfig."""
    return ServeConfig.from_argv(argv, description=__doc__)


async def serve(config: ServeConfig) -> None:
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
    try:
        await balancer.start()
        front = CompletionServer(balancer, metrics, module, config.served_model_name, api_key=config.api_key)
        server = await asyncio.start_server(front.handle, sock=sock)
        port = sock.getsockname()[1]
        host = "[::1]" if config.host == "::1" else config.host
        print(f"serving {config.served_model_name} on http://{host}:{port} with {config.summary()}", flush=True)
        report_port(port)   # to start_server, through its pipe
        await stop.wait()
        server.close()
        for task in list(front.connections):
            task.cancel()
    finally:
        await balancer.stop()
        sock.close()


def main(argv=None):
    asyncio.run(serve(parse_args(argv)))
    print("server stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
