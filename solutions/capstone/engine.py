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
        check_plan(plan, CONFIG)
        self.plan, self.policy, self.batching, self.max_batch = plan, policy, batching, max_batch
        self.kv_cache = dict(kv_cache or {})
        self.server = None

    def start(self) -> "CapstoneServer":
        """Exercise 6.4b — start the server (helpers.course.serving.start_server) with plan.dp replicas of
        plan.pp pipeline stages × plan.tp ranks each (its `pp` and `tp` options), the chosen batching and
        policy, and *your* router: pass choose=f"{PACKAGE}.router:choose_replica". Return self once every
        replica is up. Exercise 6.7: pass the kv_cache options too (start_server(..., **kv_cache))."""
        self.server = start_server(replicas=self.plan.dp, pp=self.plan.pp, tp=self.plan.tp, batching=self.batching,
                                   max_batch=self.max_batch, policy=self.policy,
                                   choose=f"{PACKAGE}.router:choose_replica", **self.kv_cache)
        return self

    def generate(self, prompts: list[str], max_tokens: int = 16) -> list[dict]:
        """Exercise 6.4c — send every prompt as its own greedy request (temperature 0, return_token_ids),
        all at once (one thread per prompt, at most 16), and return, in prompt order,
        {"tokens": the completion's token ids, "replica": the X-Replica header as an int}."""
        def one(prompt):
            body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                               "return_token_ids": True}).encode()
            request = urllib.request.Request(self.server.url + "/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                reply = json.loads(response.read())
                return {"tokens": reply["choices"][0]["token_ids"], "replica": int(response.headers["X-Replica"])}

        with ThreadPoolExecutor(max_workers=min(16, max(1, len(prompts)))) as pool:
            return list(pool.map(one, prompts))

    def report(self) -> dict:
        """Exercise 6.4d — scrape GET /metrics and summarise it with exercise 6.3's `summarize`."""
        from .report import summarize
        return summarize(self.server.get("/metrics"))

    def stop(self) -> None:
        """Exercise 6.4e — stop the server and all its processes (safe to call twice)."""
        if self.server is not None:
            self.server.stop()
            self.server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
