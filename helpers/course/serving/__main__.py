"""Start the course's inference server on loopback:

    python -m helpers.course.serving --replicas 2 --batching continuous --policy least_outstanding --port 8000
    python -m helpers.course.serving --replicas 1 --pp 2 --tp 2      # one replica: 2 pipeline stages × 2 TP ranks
    python -m helpers.course.serving --kv-cache paged --enable-prefix-caching --max-num-batched-tokens 64
                                              # chapter 7's paged KV cache, prefix caching and chunked prefill
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

import argparse
import asyncio
import importlib
import os
import signal
import socket
import sys

from helpers.course.serving.balancer import POLICIES, STUCK_AFTER, Balancer
from helpers.course.engine import BATCHING
from helpers.course.serving.metrics import ServingMetrics
from helpers.course.serving.replica import load_model_module
from helpers.course.serving.server import CompletionServer

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m helpers.course.serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8000, help="TCP port on 127.0.0.1 (0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help="loopback only: 127.0.0.1, localhost or ::1")
    p.add_argument("--replicas", type=int, default=2, help="data-parallel replicas (processes, or jobs of --tp ranks)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per replica (chapter 2's shard_llama, "
                   "from COURSE_IMPL's tp_llama)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages per replica, each of --tp ranks (chapter 3's "
                   "pipelined_generate; greedy requests only)")
    p.add_argument("--choose", default=None, help="module:function replacing the balancing policy "
                   "(the capstone's), called as f(policy, outstanding, turn) -> replica index")
    p.add_argument("--batching", choices=BATCHING, default="continuous")
    p.add_argument("--max-batch", type=int, default=8, help="sequences per decode step, per replica")
    p.add_argument("--policy", choices=POLICIES, default="least_outstanding")
    kv = p.add_argument_group("KV cache (chapter 7; vLLM's names)")
    kv.add_argument("--kv-cache", choices=("contiguous", "paged"), default="contiguous",
                    help="contiguous: one padded cache per batch (engine.py); paged: blocks through a block table "
                    "(paged_engine.py, exercises 7.1-7.2); with --tp each rank holds its own KV heads; --pp 1")
    kv.add_argument("--num-blocks", type=int, default=256, help="KV blocks per replica (paged)")
    kv.add_argument("--block-size", type=int, default=16, help="tokens per KV block (paged)")
    kv.add_argument("--enable-prefix-caching", action="store_true",
                    help="share cached prompt blocks between requests (paged; exercise 7.3)")
    kv.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="chunked prefill: tokens computed per step, decodes first (paged; exercise 7.4)")
    p.add_argument("--max-retries", type=int, default=3, help="re-sends of a request after replica failures")
    p.add_argument("--no-restart", action="store_true", help="do not restart replicas that die")
    p.add_argument("--stuck-after", type=float, default=STUCK_AFTER, help="seconds without a heartbeat "
                   "after which a replica is taken for stuck, killed and replaced (0: never)")
    p.add_argument("--api-key", default=os.environ.get("SERVING_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1 paths (default: $SERVING_API_KEY; "
                   "/health, /metrics and /replicas stay open, as in vLLM)")
    p.add_argument("--model", default="helpers.course.tiny_llama",
                   help="module with load_model(), encode(), decode(), CONFIG")
    p.add_argument("--model-name", default="tiny-llama", help="the name clients send as 'model'")
    args = p.parse_args(argv)
    if args.host not in LOOPBACK:
        p.error(f"--host {args.host}: this teaching server listens on loopback only (127.0.0.1)")
    for name in ("replicas", "tp", "pp"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)} must be at least 1")
    if args.api_key is not None and (not args.api_key.strip() or not args.api_key.isprintable()):
        p.error("--api-key must be printable characters, not empty")
    if args.stuck_after < 0:
        p.error(f"--stuck-after {args.stuck_after:g} must be >= 0 (0 turns the watchdog off)")
    paged_only = [f"--{n.replace('_', '-')}" for n in ("enable_prefix_caching", "max_num_batched_tokens")
                  if getattr(args, n) not in (False, None)]
    if args.kv_cache != "paged" and paged_only:
        p.error(f"{' and '.join(paged_only)} need --kv-cache paged")
    if args.kv_cache == "paged" and args.pp > 1:
        p.error(f"--kv-cache paged serves replicas without pipeline stages (--pp 1), not --pp {args.pp}")
    for name in ("num_blocks", "block_size") + (("max_num_batched_tokens",) if args.max_num_batched_tokens else ()):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} must be at least 1")
    if not 0 <= args.port < 65536:
        p.error(f"--port {args.port} is not a TCP port")
    return args


def kv_options(args) -> dict | None:
    """PagedEngine's options from the command line (None: the contiguous cache)."""
    if args.kv_cache != "paged":
        return None
    return {"num_blocks": args.num_blocks, "block_size": args.block_size,
            "prefix_caching": args.enable_prefix_caching, "token_budget": args.max_num_batched_tokens}


def kv_summary(args) -> str:
    return (f"({args.num_blocks} blocks of {args.block_size}" + (", prefix caching" if args.enable_prefix_caching
            else "") + (f", {args.max_num_batched_tokens} tokens per step" if args.max_num_batched_tokens else "")
            + ")")


def _import_function(spec):
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


async def serve(args) -> None:
    module = load_model_module(args.model)
    layers = module.CONFIG.num_hidden_layers
    if layers % args.pp:
        raise SystemExit(f"--pp {args.pp} does not divide the model's {layers} layers: each stage needs as many")
    longest = module.CONFIG.max_position_embeddings
    if args.kv_cache == "paged" and args.num_blocks * args.block_size < longest:
        # vLLM refuses to start likewise: a request of the model's full length could never run
        raise SystemExit(f"--num-blocks {args.num_blocks} × --block-size {args.block_size} = "
                         f"{args.num_blocks * args.block_size} tokens of KV cache per replica, less than the model's "
                         f"context of {longest} tokens: give at least {-(-longest // args.block_size)} blocks")
    metrics = ServingMetrics()
    family = socket.AF_INET6 if args.host == "::1" else socket.AF_INET
    sock = socket.create_server((args.host, args.port), family=family, backlog=512)
    balancer = Balancer(args.replicas, args.model, batching=args.batching, max_batch=args.max_batch,
                        policy=args.policy, max_retries=args.max_retries, restart=not args.no_restart,
                        tp=args.tp, pp=args.pp, metrics=metrics, choose=_import_function(args.choose),
                        stuck_after=args.stuck_after, kv=kv_options(args))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await balancer.start()
        front = CompletionServer(balancer, metrics, module, args.model_name, api_key=args.api_key)
        server = await asyncio.start_server(front.handle, sock=sock)
        port = sock.getsockname()[1]
        print(f"serving {args.model_name} on http://127.0.0.1:{port} with {args.replicas} replica(s), "
              f"pp={args.pp}, tp={args.tp}, batching={args.batching}, max_batch={args.max_batch}, policy={args.policy}"
              + (f", paged KV cache {kv_summary(args)}" if args.kv_cache == "paged" else "")
              + (", API key required on /v1" if args.api_key else ""), flush=True)
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
