"""Capstone, exercise 6.4 — the engine: a plan in, a served model out."""
from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from helpers.course.serving import start_server
from helpers.course.tiny_llama import CONFIG

from .plan import Plan, check_plan

PACKAGE = __package__  # "solutions.capstone" or "labs.capstone": the server imports *this* router


class CapstoneServer:
    """A handle on a running server: the course's tiny Llama with a (dp, pp, tp) plan behind a load balancer.

        with CapstoneServer(Plan(dp=2, pp=1, tp=1)) as server:
            results = server.generate(["Four score", "We hold"], max_tokens=16)
            # [{"tokens": [...], "replica": 0}, {"tokens": [...], "replica": 1}]
            server.report()       # summarize() of the server's /metrics (exercise 6.3)
    """

    def __init__(self, plan: Plan, policy: str = "least_outstanding", batching: str = "continuous",
                 max_batch: int = 8, kv_cache: dict | None = None):
        """Exercise 6.4a — check the plan (6.1) and keep the settings; start nothing yet.
        A plan the model cannot take raises check_plan's ValueError. With pp > 1 each replica is a pipeline
        (exercise 6.6): one scheduler on stage 0 and up to pp batches in flight (engine/pipeline_runner.py).
        kv_cache (exercise 6.7): None, or start_server's KV-cache options to serve from chapter 7's paged
        cache, e.g. {"kv_cache": "paged", "enable_prefix_caching": True, "max_num_batched_tokens": 64}."""
        raise NotImplementedError("Exercise 6.4: __init__ is not written yet (labs/capstone/engine.py)")

    def start(self) -> "CapstoneServer":
        """Exercise 6.4b — start the server (helpers.course.serving.start_server) with plan.dp replicas of
        plan.pp pipeline stages × plan.tp ranks each (its `pp` and `tp` options), the chosen batching and
        policy, and *your* router: pass choose=f"{PACKAGE}.router:choose_replica". Return self once every
        replica is up. Exercise 6.7: pass the kv_cache options too (start_server(..., **kv_cache))."""
        raise NotImplementedError("Exercise 6.4: start is not written yet (labs/capstone/engine.py)")

    def generate(self, prompts: list[str], max_tokens: int = 16) -> list[dict]:
        """Exercise 6.4c — send every prompt as its own greedy request (temperature 0, return_token_ids),
        all at once (one thread per prompt, at most 16), and return, in prompt order,
        {"tokens": the completion's token ids, "replica": the X-Replica header as an int}."""
        raise NotImplementedError("Exercise 6.4: generate is not written yet (labs/capstone/engine.py)")

    def report(self) -> dict:
        """Exercise 6.4d — scrape GET /metrics and summarise it with exercise 6.3's `summarize`."""
        raise NotImplementedError("Exercise 6.4: report is not written yet (labs/capstone/engine.py)")

    def stop(self) -> None:
        """Exercise 6.4e — stop the server and all its processes (safe to call twice)."""
        raise NotImplementedError("Exercise 6.4: stop is not written yet (labs/capstone/engine.py)")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
