"""Replay a chat workload on N modelled replicas behind a router: the figures of chapter 9.

Each replica is the course's engine (helpers/course/engine: LLMEngine.modelled) with a paged KV cache and prefix
caching (KVCacheManager(enable_caching=True), exercise 7.3's manager) that publishes its real KV events into an
EventChannel (transport.py); the router (router.py) applies them with its policy (policies.py). Time is modelled
device time (each engine's ModelledClock prices its steps with DeviceCost), so the figures are the same on a
quiet laptop and on a busy 2-core machine: what they show is the placement's effect, not this machine.

    result = replay(chat_workload(seed=0), KVAware(), num_replicas=4)
    result.summary()          # hit rate, prefill tokens, TTFT p50/p99, max/mean load, per replica too

The loop is a discrete-event simulation over the engines' clocks: the earliest thing happens next — a turn
arrives (the router routes it, with every event batch that has arrived by then applied), or the replica whose
clock is earliest runs one engine step (its events are published at the step's end; a finished turn schedules
the session's next turn `think` seconds later). A request that arrives while a replica is in the middle of a step
joins at its next step, as in run_requests.

Faults: `restart=(replica, t)` kills the replica at modelled time t and starts a fresh engine in its place (an
empty cache: it publishes AllBlocksCleared, vLLM's reset_prefix_cache event, as it comes up); the requests that
were outstanding there are sent again through the router (their arrival kept: the loss shows in their TTFT).
`EventChannel(delay=..., loss=...)` makes events late or lost.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from helpers.course.engine import KVCacheManager, KVEventLog, LLMEngine, Request, SchedulerConfig, percentile
from helpers.course.routing.router import Router
from helpers.course.routing.transport import EventChannel
from helpers.course.routing.workload import ChatWorkload, first_turn, next_turn

__all__ = ["ReplicaFigures", "ReplayResult", "replay", "REPLICAS", "REPLICA_BLOCKS", "BLOCK_SIZE", "SCHEDULER"]

REPLICAS = 8
BLOCK_SIZE = 16
REPLICA_BLOCKS = 160          # per replica: 2,560 tokens, two or three tenants' prompts and sessions, not sixteen
SCHEDULER = SchedulerConfig(max_num_batched_tokens=1024, max_num_seqs=16)


@dataclass
class ReplicaFigures:
    """One replica's counters over the run (summed over its engines when it restarted)."""
    requests: int = 0
    prefix_queries: int = 0        # prompt tokens looked up at admission (vLLM's prefix_cache_queries)
    prefix_hits: int = 0           # of which found in the cache (prefix_cache_hits)
    prefill_tokens: int = 0        # prompt tokens actually computed (every step's chunks)
    busy_seconds: float = 0.0      # modelled device time spent in steps

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def add_engine(self, engine: LLMEngine) -> None:
        self.prefix_queries += engine.kv.stats.queries
        self.prefix_hits += engine.kv.stats.hits
        self.prefill_tokens += sum(step.prefill_tokens for step in engine.steps)
        self.busy_seconds += engine.busy_seconds


@dataclass
class ReplayResult:
    policy: str
    workload: str
    replicas: dict                                   # replica -> ReplicaFigures
    requests: list                                   # every finished Request (a retried one once, finished)
    router_metrics: dict
    channel: dict = field(default_factory=dict)
    retried: int = 0
    promised: dict = field(default_factory=dict)     # rid -> blocks the policy expected cached where it sent it
    block_size: int = BLOCK_SIZE

    @property
    def hit_rate(self) -> float:
        q = sum(f.prefix_queries for f in self.replicas.values())
        return sum(f.prefix_hits for f in self.replicas.values()) / q if q else 0.0

    @property
    def prefill_tokens(self) -> int:
        return sum(f.prefill_tokens for f in self.replicas.values())

    def ttfts(self) -> list:
        return sorted(r.token_times[0] - r.arrival for r in self.requests if r.token_times)

    @property
    def load_imbalance(self) -> float:
        """max / mean of the device time each replica spent computing (1.0: perfectly even). Busy time, not
        requests served: a replica that gets the long conversations does more work for the same count."""
        return _max_over_mean([f.busy_seconds for f in self.replicas.values()])

    @property
    def request_imbalance(self) -> float:
        """max / mean of the requests each replica served."""
        return _max_over_mean([f.requests for f in self.replicas.values()])

    @property
    def missed_promises(self) -> int:
        """Blocks the policy counted on finding cached where it sent a request, that the replica did not have when
        it admitted the request (a stale index, a wrong prediction): each was computed again."""
        hits = {r.rid: max(r.num_cached_tokens, 0) // self.block_size for r in self.requests}
        return sum(max(blocks - hits.get(rid, 0), 0) for rid, blocks in self.promised.items()
                   if blocks is not None and rid in hits)

    def summary(self) -> dict:
        ttft = self.ttfts()
        return {"policy": self.policy, "hit_rate": self.hit_rate, "prefill_tokens": self.prefill_tokens,
                "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
                "max_mean_load": self.load_imbalance, "max_mean_requests": self.request_imbalance,
                "missed_promises": self.missed_promises, "retried": self.retried,
                "per_replica_hit_rate": {r: f.hit_rate for r, f in self.replicas.items()},
                "per_replica_requests": {r: f.requests for r, f in self.replicas.items()},
                "per_replica_prefill_tokens": {r: f.prefill_tokens for r, f in self.replicas.items()}}


def _max_over_mean(values) -> float:
    mean = sum(values) / len(values)
    return max(values) / mean if mean else float("nan")


def _engine(num_blocks: int, block_size: int, config: SchedulerConfig, cost, start: float) -> LLMEngine:
    kv = KVCacheManager(num_blocks, block_size, enable_caching=True, events=KVEventLog())
    engine = LLMEngine.modelled(kv, cost, config=config)
    engine.clock.wait_until(start)
    return engine


def replay(workload: ChatWorkload, policy, num_replicas: int = REPLICAS, num_blocks: int = REPLICA_BLOCKS,
           block_size: int = BLOCK_SIZE, config: SchedulerConfig = SCHEDULER, cost=None,
           channel: EventChannel | None = None, restart: tuple | None = None, stale_after: float | None = None,
           max_steps: int = 2_000_000) -> ReplayResult:
    """Serve every session of `workload` on `num_replicas` modelled engines behind Router(policy)."""
    channel = channel or EventChannel()
    replicas = list(range(num_replicas))
    router = Router(replicas, policy, block_size, stale_after=stale_after)
    engines = {r: _engine(num_blocks, block_size, config, cost, 0.0) for r in replicas}
    figures = {r: ReplicaFigures() for r in replicas}
    sessions = {s.sid: s for s in workload.sessions}
    session_of: dict = {}                      # rid -> session id
    live_requests: dict = {}                   # rid -> (replica, Request) outstanding
    finished: list = []
    seq = itertools.count()
    arrivals: list = []                        # (time, seq, kind, payload)
    for s in workload.sessions:
        request = first_turn(workload, s)
        session_of[request.rid] = s.sid
        heapq.heappush(arrivals, (request.arrival, next(seq), "arrive", request))
    if restart is not None:
        heapq.heappush(arrivals, (float(restart[1]), next(seq), "restart", restart[0]))
    retried = 0

    def send(request: Request, now: float) -> None:
        for replica, events, _ in channel.due(now):
            router.deliver(replica, events, now)
        replica = router.route(request, now)
        engine = engines[replica]
        if not engine.has_unfinished:
            engine.clock.wait_until(now)
        engine.add_request(request)
        live_requests[request.rid] = (replica, request)

    for _ in range(max_steps):
        busy = [r for r in replicas if engines[r].has_unfinished]
        t_engine = min((engines[r].clock.now() for r in busy), default=None)
        if arrivals and (t_engine is None or arrivals[0][0] <= t_engine):
            now, _, kind, payload = heapq.heappop(arrivals)
            if kind == "arrive":
                send(payload, now)
                continue
            replica = payload                                          # a restart
            figures[replica].add_engine(engines[replica])
            lost = router.replica_down(replica)
            channel.drop_replica(replica)
            engines[replica] = _engine(num_blocks, block_size, config, cost, now)
            engines[replica].kv.reset_prefix_cache()                   # publishes AllBlocksCleared
            channel.publish(replica, engines[replica].kv.events.take(), now)
            router.replica_up(replica)
            for rid in lost:
                old = live_requests.pop(rid)[1]
                again = Request(f"{rid}+retry", old.prompt, old.max_tokens, arrival=old.arrival)
                session_of[again.rid] = session_of[rid]
                retried += 1
                send(again, now)
            continue
        if t_engine is None:
            break
        replica = min(busy, key=lambda r: engines[r].clock.now())
        engine = engines[replica]
        done = engine.step()
        failed = engine.take_failed()
        if failed:
            raise RuntimeError(f"replica {replica}: request {failed[0].rid!r} failed: {failed[0].error}")
        now = engine.clock.now()
        channel.publish(replica, engine.kv.events.take(), now)
        for request in done:
            router.finished(replica, request.rid)
            live_requests.pop(request.rid, None)
            figures[replica].requests += 1
            finished.append(request)
            follow = next_turn(sessions[session_of[request.rid]], request, now)
            if follow is not None:
                session_of[follow.rid] = session_of[request.rid]
                heapq.heappush(arrivals, (follow.arrival, next(seq), "arrive", follow))
    else:
        raise RuntimeError(f"the replay did not finish in {max_steps} steps")
    for r in replicas:
        figures[r].add_engine(engines[r])
    return ReplayResult(policy.name, workload.label, figures, finished, router.metrics,
                        {"batches": channel.sent, "lost": channel.lost, "events": channel.events_sent,
                         "events_lost": channel.events_lost}, retried, router.promised, block_size)
