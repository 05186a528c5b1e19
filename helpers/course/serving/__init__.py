"""Chapter 6: a real inference server in front of the course's tiny Llama.

    config.py      ServeConfig: every option of the server, by vLLM's names, from the command line (or
                   start_server's keywords) to every replica, checked once
    replica.py     the replica worker process and its pipe protocol; its engine is helpers/course/engine
                   (continuous, static or no batching; contiguous or paged KV cache, prefix caching, chunked
                   prefill: `build_engine`)
    pipeline_replica.py  a replica cut into pp pipeline stages (chapters 3 and 5's stages) running the engine's
                   PipelineEngine: up to pp batches in flight (engine/pipeline_runner.py)
    balancer.py    round-robin vs least-outstanding-requests; retries when a replica dies; restarts
                   (with --routing: chapter 9's Router, subscribed to the replicas' KV events over ZeroMQ)
    protocol.py    the OpenAI-compatible requests as pydantic models (completions, chat), their checks, and
                   OpenAI's error object
    openai_serving.py  completions and chat completions on the balancer: n choices, stop strings, logprobs,
                   streaming (server-sent events), cancelling a request whose client left
    server.py      the HTTP front end: a FastAPI app (routes, API key, errors), /metrics, /health, /replicas
    limits.py      uvicorn with the front end's limits: body and header sizes, slow clients, a connection cap
    metrics.py     Prometheus metrics (prometheus-client) and a parser for scraped text
    loadtest.py    a bounded load-test client on loopback; `replay`: the engine (or replicas) on modelled time
    device_time.py modelled accelerator time of a forward (slept, or counted on a virtual clock)
    background.py  start_server(): the server as a background process that stops cleanly
    launcher.py    imports torch once and forks each server from there (start_server's fast start)
    precision.py   bf16 weights, int8 weight quantization, all-reduce bytes

Start it with one command: `python -m helpers.course.serving --replicas 2 --port 8000` (see __main__.py).
"""
from helpers.course.serving.background import ServerProcess, start_launcher, start_server
from helpers.course.serving.config import ServeConfig

__all__ = ["start_server", "start_launcher", "ServerProcess", "ServeConfig"]
