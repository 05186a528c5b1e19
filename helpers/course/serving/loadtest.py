"""A load-test client for /v1/completions on loopback: real HTTP requests, bounded in count and in time.

    result = load_test(url, n_requests=40, rate=20.0, max_tokens=16)      # 20 requests per second
    result.summary()   # {'sent', 'ok', 'lost', 'p50', 'p90', 'p99' (s), 'req_per_s', 'tok_per_s'}

Open loop: request i is sent at start + i / rate whatever happened to earlier ones (as users arrive),
up to `max_inflight` at once. `rate=None` sends them all at once. `prompts` and `max_tokens` (an int or a
list) are cycled through, request i taking element i mod length. The run stops by itself after
`n_requests` or `max_seconds`, whichever comes first; requests still open then are cancelled and counted
as lost. `scrape_every` also GETs /metrics that often during the run (for plots over time).
`load_test` runs its own event loop in a thread, so it works in a notebook cell as well as in a script.

`replay(model, batching, arrivals, max_tokens, prompt)` is the same experiment on modelled device time: one
replica's engine (helpers/course/engine, the same LLMEngine a server replica runs), fed the requests at their
arrival times, each step advancing its clock by the step's modelled device time (engine/clock.py's
step_seconds over device_time.DeviceCost) instead of taking wall time. Deterministic, so a policy
comparison holds on any machine however busy; it also records when every token was produced, for the
time to first token (TTFT) and inter-token latency (ITL) that a non-streaming HTTP client cannot see.

    result = replay(model, "continuous", poisson_arrivals(rate=20, n=200), [2, 16, 4], prompt_ids)
    result.summary()   # {'ok', 'p50', 'p99', 'ttft_p50', 'ttft_p99', 'itl_p50', 'itl_p99', 'tok_per_s', ...}
"""
from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import urllib.parse

from helpers.course.engine.stats import EngineResult, percentile  # noqa: F401  (the one percentile)


class LoadResult:
    def __init__(self, records, scrapes, started, seconds):
        self.records, self.scrapes, self.started, self.seconds = records, scrapes, started, seconds

    @property
    def ok(self):
        return [r for r in self.records if r["status"] == 200]

    def latencies(self):
        return sorted(r["latency"] for r in self.ok)

    def summary(self) -> dict:
        lat = self.latencies()
        tokens = sum(r["tokens"] for r in self.ok)
        span = max((r["end"] for r in self.ok), default=0.0) - min((r["start"] for r in self.records), default=0.0)
        return {"sent": len(self.records), "ok": len(self.ok), "lost": len(self.records) - len(self.ok),
                "p50": percentile(lat, 50), "p90": percentile(lat, 90), "p99": percentile(lat, 99),
                "req_per_s": len(lat) / span if span > 0 else 0.0, "tok_per_s": tokens / span if span > 0 else 0.0}


async def post_json(host, port, path, body: dict, timeout: float):
    """One HTTP/1.1 POST on a fresh connection; returns (status, headers, decoded JSON body)."""
    data = json.dumps(body).encode()

    async def exchange():
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
            await writer.drain()
            raw = await reader.read()  # the server closes the connection after its answer
        finally:
            writer.close()
        head, _, payload = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
        return status, headers, json.loads(payload) if payload else None

    return await asyncio.wait_for(exchange(), timeout)


async def get_text(host, port, path, timeout=5.0) -> str:
    async def exchange():
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
        return raw.partition(b"\r\n\r\n")[2].decode()
    return await asyncio.wait_for(exchange(), timeout)


async def run_load(url, n_requests=32, rate=None, max_inflight=64, max_seconds=30.0, max_tokens=16,
                   prompts=("It was the best of times",), temperature=0.0, request_timeout=30.0,
                   scrape_every=None, on_start=None) -> LoadResult:
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"{url}: the load test only talks to loopback servers")
    n_requests = int(n_requests)
    if not 1 <= n_requests <= 10_000:
        raise ValueError(f"n_requests={n_requests}: keep a load test between 1 and 10000 requests")
    started = time.time()
    deadline = time.monotonic() + max_seconds
    gate = asyncio.Semaphore(max_inflight)
    records, scrapes = [], []

    async def one(i):
        n_tokens = max_tokens[i % len(max_tokens)] if isinstance(max_tokens, (list, tuple)) else max_tokens
        body = {"prompt": prompts[i % len(prompts)], "max_tokens": n_tokens, "temperature": temperature,
                "return_token_ids": True}
        record = {"i": i, "status": None, "start": time.time() - started}
        records.append(record)
        try:
            status, headers, reply = await post_json(host, port, "/v1/completions", body,
                                                     min(request_timeout, max(0.01, deadline - time.monotonic())))
            record.update(status=status)
            if status == 200:
                record.update(tokens=reply["usage"]["completion_tokens"], token_ids=reply["choices"][0]["token_ids"],
                              replica=int(headers.get("x-replica", -1)), retries=int(headers.get("x-retries", 0)))
            else:
                record.update(error=(reply or {}).get("error", {}).get("message"))
        except (OSError, asyncio.TimeoutError, ValueError) as e:
            record.update(status=0, error=f"{type(e).__name__}: {e}")
        finally:
            record["end"] = time.time() - started
            record["latency"] = record["end"] - record["start"]
            gate.release()

    async def scraper():
        while time.monotonic() < deadline:
            try:
                scrapes.append((time.time() - started, await get_text(host, port, "/metrics")))
            except (OSError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(scrape_every)

    scrape_task = asyncio.ensure_future(scraper()) if scrape_every else None
    tasks = []
    t0 = time.monotonic()
    for i in range(n_requests):
        if rate:
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        if time.monotonic() >= deadline:
            break
        await gate.acquire()
        if on_start is not None:
            on_start(i, time.time() - started)
        tasks.append(asyncio.ensure_future(one(i)))
    if tasks:
        await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()) + 1.0)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if scrape_task is not None:
        scrape_task.cancel()
        await asyncio.gather(scrape_task, return_exceptions=True)
        try:
            scrapes.append((time.time() - started, await get_text(host, port, "/metrics")))
        except (OSError, asyncio.TimeoutError):
            pass
    for r in records:
        if r["status"] is None:
            r.update(status=0, error="cancelled: the load test's time ran out", end=time.time() - started)
            r["latency"] = r["end"] - r["start"]
    records.sort(key=lambda r: r["i"])
    return LoadResult(records, scrapes, started, time.time() - started)


def load_test(url, **options) -> LoadResult:
    """Run `run_load` to completion in a fresh event loop on a helper thread (notebook-safe)."""
    box = {}

    def target():
        try:
            box["result"] = asyncio.run(run_load(url, **options))
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    thread = threading.Thread(target=target, name="load-test", daemon=True)
    thread.start()
    thread.join(options.get("max_seconds", 30.0) + 30.0)
    if thread.is_alive():
        raise TimeoutError("the load test did not stop by itself")
    if "error" in box:
        raise box["error"]
    return box["result"]


# ---------------------------------------------------------------------------------- virtual-clock replay
def poisson_arrivals(rate: float, n: int, seed: int = 0) -> list[float]:
    """n arrival times (s) of a Poisson process of `rate` requests per second, the same for a given seed."""
    if not rate > 0 or n < 1:
        raise ValueError(f"rate={rate} must be > 0 and n={n} >= 1")
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


class ReplayResult(EngineResult):
    """The engine's result (EngineResult: requests, steps) with the per-request records a load test reports:
    records[i] = {i, arrival, token_times, finished, tokens, replica}, all in seconds on the modelled clock."""

    def __init__(self, requests, steps, replicas=None):
        super().__init__(requests, steps)
        replicas = replicas or {}
        self.records = [{"i": r.rid, "arrival": r.arrival, "token_times": list(r.token_times), "finished": r.finished,
                         "tokens": list(r.tokens), "replica": replicas.get(r.rid, 0)} for r in requests]

    def latencies(self):
        return sorted(r["finished"] - r["arrival"] for r in self.records)

    def summary(self) -> dict:
        lat, ttft, itl = self.latencies(), self.ttfts(), self.itls()
        span = max(r["finished"] for r in self.records) - min(r["arrival"] for r in self.records)
        tokens = sum(len(r["tokens"]) for r in self.records)
        return {"ok": len(self.records), "steps": len(self.steps), "p50": percentile(lat, 50),
                "p99": percentile(lat, 99), "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
                "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
                "tok_per_s": tokens / span if span > 0 else 0.0}


def _replay_engine(model, cost, max_batch, batching):
    """One replica's engine on modelled device time: the model's real forwards, or none for a ScheduleOnlyLM."""
    from helpers.course.engine import LLMEngine, ModelledClock, SchedulerConfig, continuous_batching_step
    from helpers.course.serving.device_time import ScheduleOnlyLM
    config = SchedulerConfig(max_num_batched_tokens=1 << 20, max_num_seqs=max_batch)
    if isinstance(model, ScheduleOnlyLM):
        return LLMEngine.modelled(cost=cost, config=config, batching=batching, schedule_step=continuous_batching_step)
    return LLMEngine.contiguous(model, config=config, batching=batching, clock=ModelledClock(cost))


def replay(model, batching: str, arrivals: list[float], max_tokens, prompt: list[int], max_batch: int = 8,
           cost=None) -> ReplayResult:
    """Serve len(arrivals) greedy requests (request i: `prompt`, max_tokens[i mod len]) with one replica's
    engine on modelled device time; see the module docstring. `model` is the tiny Llama, or a ScheduleOnlyLM
    (no forward at all: the schedule alone)."""
    return replay_balanced([model], None, "round_robin", arrivals, max_tokens, prompt, max_batch, cost, batching)


def replay_balanced(models, choose, policy: str, arrivals: list[float], max_tokens, prompt: list[int],
                    max_batch: int = 8, cost=None, batching: str = "continuous") -> ReplayResult:
    """`replay` with len(models) replicas behind a balancer: each request goes, when it arrives, to
    `choose(policy, outstanding, turn)` (exercise 6.2's contract: outstanding[i] = requests sent to replica
    i and not yet answered at that moment). Every replica is its own device with its own modelled clock;
    events are taken in time order. Records also say which replica served each request."""
    from helpers.course.engine import Request

    lengths = list(max_tokens) if isinstance(max_tokens, (list, tuple)) else [max_tokens]
    if list(arrivals) != sorted(arrivals):
        raise ValueError("arrivals must be in increasing order")
    if choose is None and len(models) != 1:
        raise ValueError("several replicas need a `choose` policy function")
    engines = [_replay_engine(m, cost, max_batch, batching) for m in models]
    queue, requests, replica_of = list(enumerate(arrivals)), [], {}
    queue.reverse()
    sent, answered = [0] * len(models), [[] for _ in models]   # answered: times of answers, per replica
    turn = 0
    while queue or any(e.has_unfinished for e in engines):
        busy = [r for r, e in enumerate(engines) if e.has_unfinished]
        next_step = min(busy, key=lambda r: engines[r].clock.now()) if busy else None
        if queue and (next_step is None or queue[-1][1] <= engines[next_step].clock.now()):
            i, t = queue.pop()   # route the arrival, seeing the answers given by time t
            outstanding = [sent[r] - sum(1 for a in answered[r] if a <= t) for r in range(len(models))]
            r = 0 if choose is None else choose(policy, outstanding, turn)
            turn += 1
            request = Request(i, prompt, lengths[i % len(lengths)], arrival=t)
            requests.append(request)
            replica_of[i] = r
            sent[r] += 1
            if not engines[r].has_unfinished:
                engines[r].clock.wait_until(t)   # an idle device starts when work arrives
            engines[r].add_request(request)
            continue
        r = next_step
        for request in engines[r].step():
            answered[r].append(request.finished)
        failed = engines[r].take_failed()
        if failed:
            raise RuntimeError(f"request {failed[0].rid} failed in the engine: {failed[0].error}")
    steps = [step for e in engines for step in e.steps]
    return ReplayResult(sorted(requests, key=lambda q: q.rid), steps, replica_of)
