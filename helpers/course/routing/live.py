"""Chapter 9 on real processes: the course's server (chapter 6) with paged, prefix-caching replicas that publish
their KV events over ZeroMQ, a short chat workload sent over HTTP, routed by round robin and by the KV events.

    results = compare()                        # {"round_robin": LiveResult, "kv_aware": LiveResult}
    python -m helpers.course.routing.live      # the same, as a table

Each policy gets a fresh server (`python -m helpers.course.serving --replicas 4 --kv-cache paged
--enable-prefix-caching --num-blocks 24 --kv-events-config '{"enable_kv_cache_events": true, "endpoint":
"tcp://*:0"}' --routing kv_aware`), cold caches, and the same sessions; the figures are the replicas' own, read
from the server's /metrics: prompt tokens looked up and found in each replica's prefix cache
(serving_replica_prefix_cache_queries/hits, vLLM's prefix_cache_queries/hits per engine), prompt tokens each replica
computed (serving_prefill_tokens_computed), requests routed and KV events applied (serving_router_*).

What differs from the modelled replay (replay.py, the chapter's measurement): the tiny Llama's context is 256
tokens, so the workload is the chapter's shape at a smaller size (8 tenants with system prompts of 64-96 tokens,
sessions of 2-4 turns); time is this machine's, shared with whatever else runs, and requests are sent by a few
client threads as fast as they are answered rather than at modelled arrival times, so which replica is least
loaded at a given moment, and the figures, vary from run to run. Compare directions (KV-aware finds more of
each prompt cached and computes fewer prompt tokens than round robin), not equal numbers.
"""
from __future__ import annotations

import argparse
import json
import queue
import threading
import time
from dataclasses import dataclass, field

from helpers.course.routing.workload import ChatWorkload, chat_workload, first_turn, next_turn
from helpers.course.serving.config import ServeConfig
from helpers.course.serving.metrics import parse, value

__all__ = ["LIVE_WORKLOAD", "LiveResult", "live_workload", "live_config", "run_live", "compare"]

# The chapter's workload shape, sized for the tiny Llama's 256-token context: longest prompt + answer <= 200 tokens
LIVE_WORKLOAD = dict(num_tenants=8, sessions=16, turns=(2, 4), system_tokens=(64, 96), user_tokens=(8, 16),
                     answer_tokens=(4, 8))
REPLICAS = 4
NUM_BLOCKS = 24               # per replica: 384 tokens, the system prompts of two or three tenants, not eight
BLOCK_SIZE = 16
CONCURRENCY = 6               # client threads, one session at a time each
WEIGHT = 4.0                  # the chapter's overlap_score_weight (routing/__main__.py CHAPTER_WEIGHT)


def live_workload(seed: int = 0) -> ChatWorkload:
    """The chat workload the live run sends (workload.py's generator with LIVE_WORKLOAD's sizes)."""
    workload = chat_workload(seed=seed, **LIVE_WORKLOAD)
    return ChatWorkload(workload.system_prompts, workload.sessions, "live chat")


def live_config(routing: str, replicas: int = REPLICAS, num_blocks: int = NUM_BLOCKS,
                weight: float = WEIGHT, **options) -> ServeConfig:
    """The server of a live run: paged replicas with prefix caching publishing KV events (each on a port the OS
    picks), chapter 9's Router with `routing`."""
    return ServeConfig.from_options(
        port=0, replicas=replicas, kv_cache="paged", enable_prefix_caching=True, num_blocks=num_blocks,
        block_size=BLOCK_SIZE, routing=routing, kv_overlap_score_weight=weight,
        kv_events_config=json.dumps({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:0"}),
        **options)


@dataclass
class LiveResult:
    routing: str
    replicas: dict                       # replica -> {"queries", "hits", "prefill_tokens", "routed"}
    router: dict                         # /replicas' "router" at the end (events applied, index blocks, ...)
    requests: int
    seconds: float
    answers: dict = field(default_factory=dict)    # rid -> generated token ids

    @property
    def hit_rate(self) -> float:
        queries = sum(r["queries"] for r in self.replicas.values())
        return sum(r["hits"] for r in self.replicas.values()) / queries if queries else 0.0

    @property
    def prefill_tokens(self) -> int:
        return int(sum(r["prefill_tokens"] for r in self.replicas.values()))

    def per_replica_hit_rate(self) -> dict:
        return {i: r["hits"] / r["queries"] if r["queries"] else 0.0 for i, r in self.replicas.items()}


def _scrape(server, replicas: int) -> dict:
    samples = parse(server.get("/metrics"))
    return {i: {"queries": value(samples, "serving_replica_prefix_cache_queries_total", replica=i),
                "hits": value(samples, "serving_replica_prefix_cache_hits_total", replica=i),
                "prefill_tokens": value(samples, "serving_prefill_tokens_computed_total", replica=i),
                "routed": value(samples, "serving_router_routed_total", replica=i)} for i in range(replicas)}


def _settled(server, replicas: int, requests: int, timeout: float = 10.0) -> dict:
    """The replicas' figures once their last reports are in: the routed counts add up to the requests sent and two
    scrapes in a row agree (a replica reports its counters right after it answers: poll, with a deadline)."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        figures = _scrape(server, replicas)
        if figures == last and sum(f["routed"] for f in figures.values()) >= requests:
            return figures
        if time.monotonic() > deadline:
            raise TimeoutError(f"the replicas' figures did not settle within {timeout:g} s: {figures}")
        last = figures
        time.sleep(0.05)


def run_live(workload: ChatWorkload, routing: str, replicas: int = REPLICAS, num_blocks: int = NUM_BLOCKS,
             concurrency: int = CONCURRENCY, weight: float = WEIGHT) -> LiveResult:
    """Start a server (live_config), send every session of `workload` (CONCURRENCY client threads, each one
    session's turns in order: a turn's prompt is the conversation so far, answers included), read the figures."""
    from helpers.course.serving import start_server
    sessions: queue.Queue = queue.Queue()
    for s in workload.sessions:
        sessions.put(s)
    answers, errors = {}, []
    with start_server(live_config(routing, replicas, num_blocks, weight)) as server:
        started = time.perf_counter()

        def client():
            while not errors:
                try:
                    session = sessions.get_nowait()
                except queue.Empty:
                    return
                request = first_turn(workload, session)
                while request is not None:
                    try:
                        out = server.complete(prompt=request.prompt, max_tokens=request.max_tokens, temperature=0,
                                              return_token_ids=True)
                    except Exception as e:          # say which request, stop the run
                        errors.append(f"{request.rid}: {type(e).__name__}: {e}")
                        return
                    request.tokens = list(out["choices"][0]["token_ids"])
                    answers[request.rid] = request.tokens
                    request = next_turn(session, request, 0.0)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
        if errors:
            raise RuntimeError(f"the live run failed: {errors[0]}\n{server._log_text()[-2000:]}")
        figures = _settled(server, replicas, len(answers))
        router = server.get("/replicas")["router"]
    return LiveResult(routing, figures, router, len(answers), seconds, answers)


def compare(routings=("round_robin", "kv_aware"), seed: int = 0, **options) -> dict:
    """{routing: LiveResult} for the same workload (live_workload(seed)), a fresh server each."""
    workload = live_workload(seed)
    return {routing: run_live(workload, routing, **options) for routing in routings}


def table(results: dict) -> str:
    head = f"{'routing':20s} {'hit rate':>8s} {'prefill tok':>11s} {'requests per replica':>22s}  hit rate per replica"
    rows = [head, "-" * len(head)]
    for routing, r in results.items():
        routed = [int(f["routed"]) for f in r.replicas.values()]
        rates = " ".join(f"{h:.0%}" for h in r.per_replica_hit_rate().values())
        rows.append(f"{routing:20s} {r.hit_rate:8.1%} {r.prefill_tokens:11,d} {str(routed):>22s}  {rates}")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--routing", nargs="+", default=["round_robin", "kv_aware"])
    args = parser.parse_args(argv)
    started = time.perf_counter()
    workload = live_workload(args.seed)
    print(workload.describe())
    results = compare(args.routing, seed=args.seed)
    print(table(results))
    for routing, r in results.items():
        print(f"  {routing}: {r.requests} requests in {r.seconds:.1f} s; router applied "
              f"{r.router['events_applied']} KV events, rejected {r.router['events_rejected']}, batches missed "
              f"{sum(r.router['batches_missed'].values())}")
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
