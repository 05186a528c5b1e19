"""The load balancer: N replica processes behind one front end, a policy that picks one per request, and
the fault tolerance that makes a dying replica invisible to clients.

Policies
    round_robin          replica 0, 1, 2, 0, 1, ... among those up: simple, blind to load
    least_outstanding    the replica with the fewest requests sent and not yet answered (ties go round
                         robin): a slow or busy replica gets less work. Envoy calls it LEAST_REQUEST, the
                         vLLM production-stack router and llm-d do the same with queue lengths.
    The balancer does not contain the rule: it calls a policy function choose(policy, outstanding, turn),
    by default exercise 6.2's `choose_replica` (capstone/router.py of COURSE_IMPL, found with load_impl), so
    the server balances with the learner's code. While 6.2 is not written yet it says so in one line and
    uses the reference answer; the config's `choose` (--choose module:function) plugs in another one.

Fault tolerance
    A replica's death shows up as end-of-file on its pipe. Every request it held is sent again to another
    replica (at most `max_retries` times); while no replica is up, requests wait in a backlog. Generation is
    deterministic per request (greedy, or sampled with the request's own seed), so a retried request returns
    exactly what the first attempt would have. A new process is started in the dead one's place and takes
    work once it reports "ready".

    A replica whose new process cannot even be started (fork or mp.Pipe failing, e.g. EMFILE: too many open files)
    is tried again with a growing delay (RESPAWN_DELAYS, then every RESPAWN_MAX_DELAY seconds), never given up
    once the server serves; why a replica is not up is in `health()` (the front end's /health) and `describe()`,
    and the failed starts are counted in serving_replica_spawn_failures_total.

    A replica that is alive but stuck (stopped with SIGSTOP, hung in a step, starved) sends no EOF. Every
    replica reports at least every replica.HEARTBEAT seconds; a watchdog takes one that stays silent for
    `stuck_after` seconds out of rotation, kills it (and its ranks) and then treats it as dead: its requests
    are retried elsewhere and a new process is started.

    A request that fails *on its own* — the replica answers ("failed", rid, status, message): invalid for the
    engine (400) or it raised inside the engine (500) — is not retried: it would fail the same way on every
    replica. Only the death of a replica, which says nothing about the request, sends a request elsewhere.

Streaming
    `stream = balancer.submit(params)` returns at once; `async for out in stream` gives one item per replica
    message: out["token_ids"] (the tokens new since the last item), out["logprobs"] (None, or one
    {"logprob", "top"} per new token), out["finished"] (True on the last item, which carries the replica's
    "timings"), out["replica"], out["retries"]. The iterator raises RequestFailed or NoReplicaError, and ends
    quietly after `balancer.cancel(stream.rid)`. A replica sends ("tokens", rid, ids, logprobs) after every step
    and ("done", rid, all tokens, timings) at the end; a replica that sends only "done" (the pipeline replica)
    streams in one piece. After a retry the new attempt regenerates the tokens already streamed (the same ones:
    the seed of an unseeded sampled request is drawn here, once, not in the replica); they are dropped, so a
    client never receives a token twice. vLLM's front end likewise consumes a per-request output queue fed by
    the engine (vllm/v1/engine/output_processor.py, RequestOutputCollector; async_llm.py `generate`).

Routing on KV events (chapter 9)
    With `routing` (--routing round_robin|least_outstanding|kv_aware|approx_tree) the balancer asks chapter 9's
    Router (helpers/course/routing/router.py) instead of the policy function: it hashes each prompt into the
    engines' block hashes and asks its policy (routing/policies.py). kv_aware subscribes to every replica's KV
    events over ZeroMQ (the replicas publish them with --kv-events-config: replica.py; routing/zmq_events.py's
    ZmqEventSubscriber here) and applies them before every decision and every ROUTER_POLL seconds; a malformed
    batch is counted and skipped (subscriber), a malformed or unknown event likewise (Router.deliver). A replica
    that dies leaves the router's pool at once (Router.replica_down drops its index entries: a new process starts
    with an empty cache) and rejoins when its new process is ready, subscribed again at its new publisher. The
    router's counters are on /metrics (metrics.py RouterCollector): events applied and rejected, batches
    missed and malformed, stale replicas, requests routed per replica, index blocks per replica.

Outstanding requests
    A replica's outstanding count is what it still holds: requests sent and not answered, plus requests
    cancelled by the front end (client gone, timeout) whose cancel the replica has not yet acknowledged.
    A replica that cannot even read its cancels does not look idle to least-outstanding balancing.
"""
from __future__ import annotations

import asyncio
import importlib
import importlib.util
import itertools
import multiprocessing as mp
import os
import random
import time
from collections import deque

from helpers import proctree
from helpers.course.serving.config import HEARTBEAT, POLICIES, STUCK_AFTER, ServeConfig  # noqa: F401
from helpers.course.serving.replica import replica_main
from helpers.impl import DEFAULT, REFERENCE, impl_package, load_impl, unwritten_exercises

ROUTER_POLL = 0.02        # seconds between the front end's reads of the replicas' KV events (also before each route)
MAX_FAILED_STARTS = 3     # deaths before "ready", in a row, that make the server's start fail
RESPAWN_FIRST_DELAY = 0.25   # seconds before a replica's process is started again after a failed start; doubles
RESPAWN_MAX_DELAY = 30.0     # up to this

# The exercises a replica's code runs, by option: module of COURSE_IMPL -> names it calls (helpers/impl.py)
EXERCISES_USED = {
    "paged": {"paged_kv_cache": ("BlockManager", "paged_attention"), "chunked_prefill": ("schedule_step",)},
    "prefix caching": {"prefix_cache": ("block_hashes", "PrefixCachingBlockManager")},
    "tensor parallel": {"tp_llama": ("shard_llama",)},
    "pipeline of tensor-parallel stages": {"hybrid": ("build_hybrid_stage",)},
}
# What chapter 9's Router runs in the front end: exercise 7.3's hashes for every routing; 9.1 and 9.2 for kv_aware
ROUTER_EXERCISES = {"prefix_cache": ("block_hashes",)}
KV_ROUTER_EXERCISES = {"kv_router": ("KVIndex", "choose_replica_kv")}


def course_router():
    """The policy function the server balances with by default: exercise 6.2's `choose_replica` from
    COURSE_IMPL (labs: the learner's). While the labs one is still a stub, the reference answer, with one
    line saying so; under a grader (COURSE_FALLBACK=0, solutions/ blocked), the stub itself, which raises its error."""
    router = load_impl("capstone.router")
    choose = router.choose_replica
    written_here = getattr(choose, "__module__", None) == router.__name__   # not already swapped in a kernel
    if impl_package() != DEFAULT or not written_here or "choose_replica" not in unwritten_exercises(router.__file__):
        return choose
    if os.environ.get("COURSE_FALLBACK") in ("0", "", "false", "no"):
        return choose
    try:
        reference = importlib.import_module(f"{REFERENCE}.capstone.router")
    except ImportError:
        return choose
    print("Exercise 6.2 not written yet in labs/capstone/router.py: this server balances with the reference "
          "answer (solutions/).", flush=True)
    return reference.choose_replica


def _fallback_setting() -> bool | None:
    """COURSE_FALLBACK: True (on), False (off: a grader), None (unset: a learner's terminal)."""
    setting = os.environ.get("COURSE_FALLBACK")
    return None if setting is None else setting not in ("0", "", "false", "no")


def replica_exercises(config: ServeConfig) -> dict:
    """Environment for the replica processes, after checking the exercises their code runs (the paged KV cache,
    chapter 7; shard_llama for --tp, chapter 2; build_hybrid_stage for --pp with --tp, chapter 5). With labs/ as
    shipped those are stubs, and a server whose every request fails with NotImplementedError would report itself
    healthy. So, as course_router does for 6.2:
      a learner's terminal (COURSE_FALLBACK unset): one line says which exercises are not written yet, and the
          replicas use the reference answers (helpers/impl.py's fallback, switched on for them with
          {"COURSE_FALLBACK": "1"}, its per-module lines silenced);
      a grader (COURSE_FALLBACK=0): the server does not start (SystemExit naming the exercises);
      a notebook (COURSE_FALLBACK=1): the replicas fall back and report it to the kernel by themselves."""
    used = dict(EXERCISES_USED["paged"]) if config.kv_cache == "paged" else {}
    if config.kv_cache == "paged" and config.enable_prefix_caching:
        used.update(EXERCISES_USED["prefix caching"])
    if config.tensor_parallel_size > 1:
        used.update(EXERCISES_USED["tensor parallel" if config.pipeline_parallel_size == 1 else
                                   "pipeline of tensor-parallel stages"])
    return _exercise_fallback(used, "this server's replicas")


def router_exercises(config: ServeConfig) -> dict:
    """As replica_exercises, for what chapter 9's Router runs in the front end (--routing): the environment to
    build the Router under ({} when every exercise it runs is written, or COURSE_IMPL is not labs)."""
    if config.routing is None:
        return {}
    used = dict(ROUTER_EXERCISES, **(KV_ROUTER_EXERCISES if config.routing == "kv_aware" else {}))
    return _exercise_fallback(used, "this server's router")


def _exercise_fallback(used: dict, who: str) -> dict:
    """{} or the environment that makes load_impl fall back to the reference answers of `used`'s exercises not
    written yet in labs/ (SystemExit under a grader). who: what runs them, for the messages."""
    if impl_package() != DEFAULT:
        return {}
    missing = {}   # stub message -> file
    for module, names in used.items():
        try:
            path = importlib.util.find_spec(f"{DEFAULT}.{module}").origin
        except (ImportError, AttributeError):
            continue
        for name, message in unwritten_exercises(path).items():
            if name in names:
                missing[message.split(":")[0]] = f"{DEFAULT}/{module.replace('.', '/')}.py"
    if not missing:
        return {}
    exercises = ", ".join(sorted(missing, key=lambda e: [int(x) for x in e.split()[-1].split(".")]))
    files = ", ".join(sorted(set(missing.values())))
    fallback = _fallback_setting()
    s = "s" if who.endswith("router") else ""     # "the router runs", "the replicas run"
    if fallback is False:
        raise SystemExit(f"{who} run{s} {exercises}, not written yet ({files}): write "
                         f"{'it' if len(missing) == 1 else 'them'}, or serve the reference answers with "
                         "COURSE_IMPL=solutions (COURSE_FALLBACK=0: no fallback to them)")
    if fallback:
        return {}
    print(f"{exercises} not written yet in {files}: {who} use{s} the reference answers (solutions/).", flush=True)
    return {"COURSE_FALLBACK": "1", "COURSE_FALLBACK_NOTES": os.devnull}


def build_router(config: ServeConfig):
    """Chapter 9's Router over the replicas' indices with config.routing's policy, every replica down until its
    process reports ready. Built under router_exercises' environment: the learner's 7.3 (hashes) and 9.1-9.2
    (kv_aware), or the reference answers while they are not written, as the replicas do."""
    from helpers.course.routing.policies import ApproxTree, KVAware, LeastOutstanding, RoundRobin
    from helpers.course.routing.router import Router
    policies = {"round_robin": RoundRobin, "least_outstanding": LeastOutstanding, "approx_tree": ApproxTree,
                "kv_aware": lambda: KVAware(config.kv_overlap_score_weight)}
    env = router_exercises(config)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        router = Router(range(config.data_parallel_size), policies[config.routing](), config.block_size,
                        stale_after=config.kv_events_stale_after or None)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    for i in range(config.data_parallel_size):
        router.replica_down(i)
    return router


class RoutedRequest:
    """What the Router reads of a request: rid, prompt (token ids), num_prompt_tokens, cache_salt."""
    __slots__ = ("rid", "prompt", "num_prompt_tokens", "cache_salt")

    def __init__(self, pending):
        self.rid, self.prompt = pending.rid, pending.params["prompt"]
        self.num_prompt_tokens, self.cache_salt = len(self.prompt), pending.params.get("cache_salt")


class NoReplicaError(RuntimeError):
    """A request failed on every attempt (all replicas down for longer than its timeout, or too many retries)."""


class RequestFailed(RuntimeError):
    """The replica answered that this request failed there (status 400: invalid, 500: a bug it hit). Not
    retried: the same request would fail the same way on any replica."""

    def __init__(self, status: int, message: str, replica: int):
        super().__init__(message)
        self.status, self.message, self.replica = status, message, replica


class Stream:
    """What `Balancer.submit` returns: `rid`, and an async iterator of the request's output items (module
    docstring). Fed by the balancer on the event loop; read by the front end."""

    def __init__(self, rid: int):
        self.rid = rid
        self._queue: asyncio.Queue = asyncio.Queue()
        self.closed = False      # nothing more will be put (finished, failed or cancelled)
        self._ended = False      # the reader reached the end

    def _put(self, item) -> None:
        """An output dict; an exception to raise in the reader; None: end without a finished item (cancelled)."""
        if self.closed:
            return
        self.closed = item is None or isinstance(item, BaseException) or item["finished"]
        self._queue.put_nowait(item)

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        if self._ended:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is None or isinstance(item, BaseException):
            self._ended = True
            if item is None:
                raise StopAsyncIteration
            raise item
        self._ended = item["finished"]
        return item


class Pending:
    """A request the balancer owns until a replica answers it."""

    def __init__(self, rid: int, params: dict):
        self.rid, self.params, self.stream = rid, params, Stream(rid)
        self.attempts = 0
        self.replicas: list[int] = []  # every replica it was sent to, in order
        self.emitted: list[int] = []   # tokens given to the stream, over all attempts
        self.received = 0              # tokens the current attempt has sent
        # TTFT and time per output token are measured here, in the front end, from the request's arrival, as vLLM's
        # front end measures them (vllm/v1/metrics/stats.py: update_from_output, update_from_finished_request)
        self.arrival = time.monotonic()
        self.first_token_at = self.last_token_at = None

    @property
    def closed(self) -> bool:
        return self.stream.closed

    def fail(self, error: BaseException) -> None:
        self.stream._put(error)


class ReplicaHandle:
    def __init__(self, index: int):
        self.index = index
        self.process = self.conn = None
        self.state = "stopped"       # starting -> ready -> dead -> starting ...
        self.inflight: dict[int, Pending] = {}
        self.cancelling: set[int] = set()   # cancelled here, not yet acknowledged by the replica
        self.last_heard = 0.0               # time.monotonic() of its last message
        self.stuck = 0                      # times it was found stuck and killed
        self.stats = {"busy_seconds": 0.0, "waiting": 0, "running": 0, "steps": 0, "tokens": 0}
        self.started_at = self.ready_at = self.died_at = None
        self.restarts = self.served = 0
        self.ranks: list[int] = []   # the pids of its ranks (a --tp replica's ranks are children of its process)
        self.failed_starts = 0       # deaths before "ready" in a row (at the server's start: a crash loop fails it)
        self.spawn_failures = 0      # processes that could not be started, in a row (retried with backoff)
        self.reason: str | None = None   # why it is not up (None while ready)
        self.kv_events_endpoint: str | None = None   # where its KV events are published (--kv-events-config)

    @property
    def outstanding(self) -> int:
        return len(self.inflight) + len(self.cancelling)

    def describe(self) -> dict:
        return {"index": self.index, "pid": self.process.pid if self.process else None, "ranks": self.ranks,
                "state": self.state,
                "outstanding": self.outstanding, "served": self.served, "restarts": self.restarts,
                "stuck": self.stuck,
                "reason": self.reason,
                "started_at": self.started_at, "ready_at": self.ready_at, "died_at": self.died_at,
                "kv_events_endpoint": self.kv_events_endpoint, **self.stats}


class Balancer:
    """Owns the replica processes. All methods run on one asyncio event loop (the front end's)."""

    def __init__(self, config: ServeConfig, metrics=None):
        """config: the server's ServeConfig (checked when it was made); metrics: ServingMetrics, or None."""
        self.config = config
        self.policy, self.max_retries, self.restart = config.policy, config.max_retries, config.restart
        self.stuck_after = config.stuck_after
        self._watchdog = None
        self.replicas = [ReplicaHandle(i) for i in range(config.data_parallel_size)]
        self.metrics = metrics
        # chapter 9's Router (--routing) or chapter 6's policy function (policy, outstanding, turn) -> index
        self.router = build_router(config) if config.routing is not None else None
        self.choose_policy = self.route_with_router if self.router is not None else \
            config.choose_function() or course_router()
        self._dispatching: Pending | None = None      # the request being placed (for the Router)
        self.events = None           # the KV events' ZmqEventSubscriber (kv events and a router), made in start()
        self._event_task = None
        self.replica_env = replica_exercises(config)   # SystemExit when they would fail every request
        if metrics is not None and self.router is not None and hasattr(metrics, "watch_router"):
            metrics.watch_router(self)
        self.serving = False         # set once every replica was ready: from then on, replicas are never given up
        self.backlog: deque[Pending] = deque()
        self._ids = itertools.count()
        self._rr = itertools.count()
        self._ready_event = None
        self.stopping = False

    # ------------------------------------------------------------------ processes
    async def start(self, timeout: float = 60.0) -> None:
        self._ready_event = asyncio.Event()
        if self.router is not None and self.config.kv_events() is not None:
            from helpers.course.routing.zmq_events import ZmqEventSubscriber
            self.events = ZmqEventSubscriber({}, topic=self.config.kv_events()["topic"])
            self._event_task = asyncio.ensure_future(self._read_events())
        for r in self.replicas:
            self._spawn(r)
        if self.stuck_after:
            self._watchdog = asyncio.ensure_future(self._watch())
        await self.wait_ready(len(self.replicas), timeout)
        self.serving = True

    async def wait_ready(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while sum(r.state == "ready" for r in self.replicas) < n:
            failed = [r.index for r in self.replicas if r.state == "failed"]
            if failed:
                raise RuntimeError(f"replica(s) {failed} died {MAX_FAILED_STARTS} times before becoming ready; "
                                   "their tracebacks are printed above")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {sum(r.state == 'ready' for r in self.replicas)} of {n} replicas "
                                   f"became ready within {timeout:g} s: {[r.describe() for r in self.replicas]}")
            self._ready_event.clear()
            try:
                await asyncio.wait_for(self._ready_event.wait(), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                pass

    def _spawn(self, r: ReplicaHandle) -> None:
        ours, theirs = mp.Pipe()
        try:
            process = mp.get_context("fork").Process(
                target=replica_main, name=f"replica{r.index}", daemon=False,  # a tp replica has children
                args=(theirs, r.index, self.config, self.replica_env))
            process.start()
        except BaseException:
            ours.close()
            theirs.close()
            raise
        r.process = process
        theirs.close()  # only the child holds its end now: its death means EOF on ours
        r.conn, r.state, r.started_at = ours, "starting", time.time()
        r.last_heard = time.monotonic()
        asyncio.get_running_loop().add_reader(ours.fileno(), self._on_readable, r)
        self._gauge(r)

    def _on_readable(self, r: ReplicaHandle) -> None:
        try:
            while r.conn is not None and r.conn.poll():
                self._on_message(r, r.conn.recv())
        except (EOFError, OSError):
            self._on_death(r)

    async def _watch(self) -> None:
        """The watchdog: every HEARTBEAT, a ready replica silent for stuck_after seconds is stuck."""
        while not self.stopping:
            await asyncio.sleep(HEARTBEAT)
            for r in self.replicas:
                if r.state != "ready":
                    continue
                self._on_readable(r)  # read what is waiting first: a late loop is not a silent replica
                silent = time.monotonic() - r.last_heard
                if r.state == "ready" and silent > self.stuck_after:
                    self._on_stuck(r, silent)

    def _on_stuck(self, r: ReplicaHandle, silent: float) -> None:
        print(f"replica {r.index} (pid {r.process.pid}) sent nothing for {silent:.1f} s (heartbeat every "
              f"{HEARTBEAT:g} s): taken for stuck, killed, its {len(r.inflight)} request(s) retried elsewhere",
              flush=True)
        r.state, r.stuck = "stuck", r.stuck + 1   # out of rotation at once
        self._gauge(r)
        proctree.kill_tree(r.process.pid)   # the replica and its ranks
        self._on_death(r)

    def _on_message(self, r: ReplicaHandle, msg) -> None:
        r.last_heard = time.monotonic()
        kind = msg[0]
        if kind == "kv_events":      # before "ready": subscribe now, so the first events find us connected
            r.kv_events_endpoint = msg[1]
            if self.events is not None:
                self.events.add(r.index, msg[1], self.config.kv_events()["topic"])
                self.events.next_seq[r.index] = 0      # a new publisher numbers from 0: a later first is a gap
        elif kind == "ready":
            r.state, r.ready_at, r.failed_starts, r.reason = "ready", time.time(), 0, None
            r.ranks = list(msg[2]) if len(msg) > 2 else [msg[1]]
            if self.router is not None:
                self.router.replica_up(r.index)        # with an empty index: a new process caches nothing
            self._gauge(r)
            self._ready_event.set()
            while self.backlog and r.state == "ready":
                self._dispatch(self.backlog.popleft())
        elif kind == "tokens":
            _, rid, token_ids, logprobs = msg
            pending = r.inflight.get(rid)
            if pending is not None and not pending.closed:
                self._emit(pending, r, token_ids, logprobs)
        elif kind == "done":
            _, rid, tokens, timings = msg[:4]
            logprobs = msg[4] if len(msg) > 4 else None   # of the tokens this attempt had not streamed
            pending = r.inflight.pop(rid, None)
            r.cancelling.discard(rid)
            self._router_finished(r, rid)
            r.served += 1
            if pending is not None and not pending.closed:
                # a replica that streamed has sent every token already; one that did not sends them all here
                self._emit(pending, r, tokens[pending.received:], logprobs, timings=timings)
                self._observe_finished(pending)
            self._gauge(r)
        elif kind == "failed":
            _, rid, status, message = msg
            pending = r.inflight.pop(rid, None)
            r.cancelling.discard(rid)
            self._router_finished(r, rid)
            if pending is not None and not pending.closed:
                pending.fail(RequestFailed(status, message, r.index))
            self._gauge(r)
        elif kind == "cancelled":
            r.cancelling.discard(msg[1])
            self._router_finished(r, msg[1])
            self._gauge(r)
        elif kind == "stats":
            stats = msg[1]
            if self.metrics is not None:
                # busy_seconds restarts at 0 in a new process: count only what it added since last report
                previous = r.stats["busy_seconds"] if stats["busy_seconds"] >= r.stats["busy_seconds"] else 0.0
                self.metrics.busy.labels(replica=r.index).inc(stats["busy_seconds"] - previous)
                if hasattr(self.metrics, "observe_kv"):
                    self.metrics.observe_kv(r.index, stats, r.stats)   # a paged replica's KV cache figures
            r.stats = stats
            self._gauge(r)

    def _on_death(self, r: ReplicaHandle) -> None:
        if r.conn is None:
            return
        asyncio.get_running_loop().remove_reader(r.conn.fileno())
        r.conn.close()
        if r.state == "starting":
            r.failed_starts += 1
        stuck = r.state == "stuck"
        r.conn, r.state, r.died_at, r.ranks = None, "dead", time.time(), []
        if self.router is not None:
            self.router.replica_down(r.index)         # its index entries dropped: its cache died with it
        if self.events is not None:
            self.events.remove(r.index)
        r.process.join(timeout=1.0)
        code = r.process.exitcode
        r.reason = ("stuck (no heartbeat), killed" if stuck else
                    "died" + (" before becoming ready" if r.failed_starts else "") +
                    ("" if code is None else f" (killed by signal {-code})" if code < 0 else f" (exit code {code})"))
        r.stats = dict(r.stats, busy_seconds=0.0, waiting=0, running=0)
        for key in ("prefix_queries", "prefix_hits", "preemptions", "prefill_tokens", "spec_num_drafts",
                    "spec_num_draft_tokens", "spec_num_accepted_tokens"):      # a new process counts from 0
            if key in r.stats:
                r.stats[key] = 0
        if "spec_accepted_per_pos" in r.stats:
            r.stats["spec_accepted_per_pos"] = []
        orphans, r.inflight, r.cancelling = list(r.inflight.values()), {}, set()
        self._gauge(r)
        for pending in orphans:
            if pending.closed:
                continue
            if self.metrics is not None:
                self.metrics.retries.inc()
            self._dispatch(pending)
        if r.failed_starts >= MAX_FAILED_STARTS and not self.serving:
            r.state = "failed"  # it cannot even start (a bug, a missing file): the server's start fails, saying so
            r.reason = f"died {r.failed_starts} times before becoming ready (its traceback is in the server's log)"
            self._ready_event.set()
        elif self.restart and not self.stopping:
            delay = 0.0 if r.failed_starts == 0 else min(RESPAWN_MAX_DELAY, 0.5 * 2 ** r.failed_starts)
            asyncio.get_running_loop().call_later(delay, self._respawn, r)

    def _respawn(self, r: ReplicaHandle) -> None:
        """Start r's new process; if that fails (fork or pipe: out of file descriptors, of processes, of
        memory), try again later, for as long as the server runs, saying why in r.reason."""
        if self.stopping or r.state != "dead":
            return
        try:
            self._spawn(r)
        except Exception as e:
            r.spawn_failures += 1
            delay = min(RESPAWN_MAX_DELAY, RESPAWN_FIRST_DELAY * 2 ** (r.spawn_failures - 1))
            r.reason = f"could not start a new process: {type(e).__name__}: {e} (tried {r.spawn_failures} " \
                       f"time(s); next try in {delay:g} s)"
            if r.spawn_failures == 1 or r.spawn_failures % 10 == 0:   # not a line a second while it lasts
                print(f"replica {r.index}: {r.reason}", flush=True)
            if self.metrics is not None and hasattr(self.metrics, "spawn_failures"):
                self.metrics.spawn_failures.inc()
            asyncio.get_running_loop().call_later(delay, self._respawn, r)
            return
        r.spawn_failures = 0
        r.restarts += 1
        if self.metrics is not None:
            self.metrics.restarts.inc()

    async def stop(self) -> None:
        """Stop every replica and fail what is still pending. Leaves no process behind."""
        self.stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._event_task is not None:
            self._event_task.cancel()
        if self.events is not None:
            self.events.close()
        loop = asyncio.get_running_loop()
        for r in self.replicas:
            if r.conn is not None:
                loop.remove_reader(r.conn.fileno())
                r.conn.close()
                r.conn = None
            if r.process is not None and r.process.is_alive():
                r.process.terminate()
        for r in self.replicas:
            if r.process is not None:
                r.process.join(timeout=2.0)
                if r.process.is_alive():
                    r.process.kill()
                    r.process.join()
            r.state = "stopped"
            for pending in r.inflight.values():
                pending.fail(NoReplicaError("the server is shutting down"))
        for pending in self.backlog:
            pending.fail(NoReplicaError("the server is shutting down"))

    # ------------------------------------------------------------------ requests
    def submit(self, params: dict) -> Stream:
        """Queue one request ({prompt, max_tokens, temperature, top_p, seed, logprobs}); returns its Stream at once
        (module docstring). A sampled request without a seed gets one here, drawn once: every attempt of it, on
        any replica, samples the same tokens, so a retry can continue the stream where the dead replica left it."""
        params = dict(params)
        if params.get("temperature", 0) > 0 and params.get("seed") is None:
            params["seed"] = random.getrandbits(63)
        pending = Pending(next(self._ids), params)
        self._dispatch(pending)
        return pending.stream

    def _emit(self, pending: Pending, r: ReplicaHandle, token_ids: list, logprobs, timings=None) -> None:
        """Give the stream what it has not had of `token_ids`, the next tokens of the current attempt (after a
        retry its first tokens repeat what an earlier attempt streamed: dropped). timings: the last item."""
        start = pending.received
        pending.received += len(token_ids)
        repeat = max(0, min(len(token_ids), len(pending.emitted) - start))   # streamed by an earlier attempt
        if token_ids[:repeat] != pending.emitted[start:start + repeat]:
            print(f"request {pending.rid}: replica {r.index} regenerated different tokens than an earlier attempt "
                  f"({token_ids[:repeat]} vs {pending.emitted[start:start + repeat]}); the stream keeps the first",
                  flush=True)
        new = list(token_ids[repeat:])
        finished = timings is not None
        if not new and not finished:
            return
        pending.emitted += new
        if new:
            now = time.monotonic()
            if pending.first_token_at is None:
                pending.first_token_at = now
                if self.metrics is not None:
                    self.metrics.ttft.observe(now - pending.arrival)
            pending.last_token_at = now
        if logprobs is None and not new and pending.params.get("logprobs") is not None:
            logprobs = []    # the last item, with no token: none of their logprobs either
        pending.stream._put({"token_ids": new, "logprobs": None if logprobs is None else list(logprobs[repeat:]),
                             "finished": finished, "replica": r.index, "retries": pending.attempts - 1,
                             "replicas": list(pending.replicas), "timings": timings})

    def _observe_finished(self, pending: Pending) -> None:
        """A request finished (its last token, or a stop string): its mean time per output token, (last token - first
        token) / (tokens - 1), as vLLM's request_time_per_output_token."""
        if self.metrics is not None and len(pending.emitted) > 1:
            self.metrics.tpot.observe((pending.last_token_at - pending.first_token_at) / (len(pending.emitted) - 1))

    def cancel(self, rid: int, finished: bool = False) -> None:
        """Forget a request (its client went away, or the front end found a stop string: finished=True, and its time
        per output token is recorded as a finished request's): its stream ends, and its replica stops computing it
        and frees its KV blocks."""
        for r in self.replicas:
            pending = r.inflight.pop(rid, None)
            if pending is not None:
                if finished:
                    self._observe_finished(pending)
                pending.stream._put(None)
                try:
                    r.conn.send(("cancel", rid))
                    r.cancelling.add(rid)   # still the replica's until it acknowledges
                except (OSError, AttributeError):
                    pass
                self._gauge(r)
        for pending in list(self.backlog):
            if pending.rid == rid:
                self.backlog.remove(pending)
                pending.stream._put(None)

    def choose(self) -> ReplicaHandle | None:
        """The replica the next request goes to, or None while none is up."""
        ready = [r for r in self.replicas if r.state == "ready"]
        if not ready:
            return None
        outstanding = [r.outstanding if r.state == "ready" else None for r in self.replicas]
        return self.replicas[self.choose_policy(self.policy, outstanding, next(self._rr))]

    def _dispatch(self, pending: Pending) -> None:
        if pending.attempts > self.max_retries:
            pending.fail(NoReplicaError(f"request failed on {pending.attempts} replicas ({pending.replicas}); "
                                        "giving up"))
            return
        self._dispatching = pending   # what chapter 9's Router routes on (route_with_router)
        r = self.choose()
        if r is None:
            self.backlog.append(pending)  # sent when a replica reports ready
            self._backlog_gauge()
            return
        pending.attempts += 1
        pending.received = 0   # this attempt starts from the first token (the ones already streamed are dropped)
        pending.replicas.append(r.index)
        r.inflight[pending.rid] = pending
        self._gauge(r)
        try:
            r.conn.send(("submit", pending.rid, pending.params))
        except OSError:
            self._on_death(r)  # re-dispatches what r held, this request included

    # ------------------------------------------------------------------ chapter 9's router
    def _router_finished(self, r: ReplicaHandle, rid: int) -> None:
        if self.router is not None:
            self.router.finished(r.index, rid)

    def route_with_router(self, policy, outstanding, turn) -> int:
        """With --routing, the policy function chapter 6's `choose` calls: the Router places the request being
        dispatched on its prompt's block hashes, the freshest KV events applied first. (policy, outstanding and
        turn are chapter 6's arguments: the Router keeps its own view of both.)"""
        self._drain_events()
        if self._dispatching is None:       # asked without a request: the least outstanding replica up
            loads = self.router.outstanding_requests()
            return min(self.router.live, key=lambda i: loads[i])
        return self.router.route(RoutedRequest(self._dispatching), now=time.monotonic())

    def _drain_events(self) -> None:
        """Apply every KV event batch that has arrived (in order per replica) to the router's policy."""
        if self.events is None:
            return
        now = time.monotonic()
        for replica, _seq, _ts, events in self.events.poll(0):
            self.router.deliver(replica, events, now)

    async def _read_events(self) -> None:
        """Keep the router's index fresh between requests (and its staleness clock right)."""
        while not self.stopping:
            try:
                self._drain_events()
            except Exception as e:      # one bad read must not end the reading
                print(f"KV events: {type(e).__name__}: {e}", flush=True)
            await asyncio.sleep(ROUTER_POLL)

    def router_state(self) -> dict | None:
        """The router's figures (for /metrics and /replicas), None without --routing."""
        if self.router is None:
            return None
        router, events = self.router, self.events
        index = getattr(router.policy, "index", None)
        return {"routing": self.config.routing, "policy": router.policy.name, "live": list(router.live),
                "routed": dict(router.metrics["routed"]), "events_applied": router.metrics["events_applied"],
                "events_rejected": router.metrics["events_rejected"],
                "stale_now": router._stale(time.monotonic()) if router.policy.uses_events else [],
                "stale_ever": list(router.metrics["stale_replicas"]),
                "stale_routings": router.metrics["stale_routings"],
                "batches_malformed": events.malformed if events is not None else 0,
                "batches_missed": dict(events.gaps) if events is not None else {},
                "index_blocks": {i: len(index.blocks_of(i)) for i in router.replicas} if index is not None else {},
                "outstanding": {i: len(router.outstanding[i]) for i in router.replicas}}

    # ------------------------------------------------------------------ metrics
    def _gauge(self, r: ReplicaHandle) -> None:
        if self.metrics is None:
            return
        m = self.metrics
        m.outstanding.labels(replica=r.index).set(r.outstanding)
        m.queue_depth.labels(replica=r.index).set(r.stats.get("waiting", 0))
        m.running.labels(replica=r.index).set(r.stats.get("running", 0))
        m.up.labels(replica=r.index).set(1 if r.state == "ready" else 0)
        self._backlog_gauge()

    def _backlog_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(replica="balancer").set(len(self.backlog))

    def describe(self) -> list[dict]:
        return [r.describe() for r in self.replicas]

    def health(self) -> dict:
        """What /health answers: {"status": "ok" or "no replica up", "replicas_up", "replicas", "reasons":
        {replica index (str): why it is not up}}; reasons is empty while every replica is up."""
        up = sum(r.state == "ready" for r in self.replicas)
        return {"status": "ok" if up else "no replica up", "replicas_up": up, "replicas": len(self.replicas),
                "reasons": {str(r.index): r.reason or r.state for r in self.replicas if r.state != "ready"}}
