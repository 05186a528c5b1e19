"""Graders for chapter 6's capstone (labs/capstone/): a served, balanced, monitored tiny Llama.

Each check takes the implementation as an argument (a module, a class, a function), so the same check grades
the learner's code and the planted wrong answers of tests/graders/planted_ch06.py. The engine checks watch
`helpers.course.serving.background.ServerProcess` (what `start_server` builds) to see which server the engine asks
for, so they grade the plan's wiring without relying on the engine's attribute names.

What the graders catch (each one planted, see test_planted_*_are_caught):
6.1 check_plan / replica_ranks
  - a bool (True == 1) or a float (2.0) accepted as a degree; a degree below 1
  - no KV-head rule (tp=3 on 8 KV heads), or a rule too strict (tp=4 on 2 KV heads is valid: heads copied)
  - vocab_size, intermediate_size or num_hidden_layers (pp) not checked; the error not naming the size
  - the plan not returned
  - ranks laid out tp-major, or stages and tp ranks swapped
6.2 choose_replica
  - the most outstanding chosen; ties always to the first, or rotated over every replica up instead of the tied
  - round robin over all replicas (skipping down ones by moving on: uneven turns)
  - a down replica (None) counted as idle; a replica with 0 outstanding taken for down
  - an unknown policy served as round robin instead of ValueError; no ValueError when none is up
6.3 summarize
  - requests or errors of other endpoints counted; only 400s counted as errors
  - replica labels left as strings; quantiles as bucket bounds instead of PromQL's interpolation
6.4-6.7 CapstoneServer
  - the plan not checked in __init__, or a server started there
  - dp, tp, pp or the policy not passed to start_server (both policies are asked for: a policy that is
    ignored passes a check asking only for the default); the learner's router not plugged in (`choose`)
  - (live) prompts sent one after another; replica index not read from X-Replica; max_tokens ignored
  - (live, 6.4) least outstanding not steering a request away from a replica busy with a long one
  - stop() not safe to call twice; (live) a replica or the front end left running after stop()
  - (6.7) the kv_cache options not passed to start_server, or only some of them
  (live, 6.7, on the server's own /metrics: the paged cache served, and its prefix cache hit the shared prompt)
"""
import contextlib
import dataclasses
import inspect
import math
import os
import sys
import threading
import time
import types

import pytest

from helpers import load_impl, proctree
from helpers.course import tiny_llama
from helpers.course.serving import background
from helpers.course.serving.config import ALIASES, ServeConfig
from helpers.course.serving.metrics import ServingMetrics, histogram_quantile, parse, value
from tests.graders.planted import assert_caught, mistake

PROMPTS = ["Four score and seven years ago", "We hold these truths", "The fox and the grapes",
           "Once upon a time", "A", "It is altogether fitting", "The tortoise", "Liberty"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def reference():
    model = tiny_llama.load_model()
    return {p: tiny_llama.generate(model, tiny_llama.encode(p), MAX_TOKENS) for p in PROMPTS}


# ------------------------------------------------------------------------------------------------ 6.1

def _config(heads=8, kv=4, inter=256, vocab=256, layers=4):
    return types.SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                                 vocab_size=vocab, num_hidden_layers=layers)


def check_plan_rules(impl):
    P, cfg = impl.Plan, tiny_llama.CONFIG
    valid = [(P(1, 1, 1), cfg, "the trivial plan"), (P(2, 1, 2), cfg, "tp=2"), (P(1, 2, 4), cfg, "tp=4 = KV heads"),
             (P(1, 4, 8), cfg, "tp=8: a multiple of the 4 KV heads, each copied to 2 ranks"),
             (P(1, 1, 4), _config(kv=2), "tp=4 on 2 KV heads: a multiple of num_key_value_heads, heads copied")]
    for plan, config, what in valid:
        try:
            got = impl.check_plan(plan, config)
        except ValueError as e:
            raise AssertionError(f"6.1 check_plan({plan}) must accept {what}; it raised ValueError: {e} "
                                 "(labs/capstone/plan.py)") from None
        assert got == plan, f"6.1 check_plan({plan}) must return the plan it accepts, got {got!r} " \
                            "(labs/capstone/plan.py)"
    invalid = [(P(0, 1, 1), cfg, "dp", "dp=0 is below 1"),
               (P(True, 1, 1), cfg, "dp", "dp=True: bool is not a number here"),
               (P(2.0, 1, 1), cfg, "dp", "dp=2.0: degrees are whole numbers (int)"),
               (P(1, 1, 3), cfg, "num_attention_heads", "tp=3 does not divide 8 attention heads"),
               (P(1, 1, 16), cfg, "num_attention_heads", "tp=16 does not divide 8 attention heads"),
               (P(1, 1, 3), _config(heads=12, kv=8, inter=384, vocab=384), "num_key_value_heads",
                "tp=3 neither divides 8 KV heads nor is a multiple of them"),
               (P(1, 1, 4), _config(vocab=250), "vocab_size", "tp=4 does not divide vocab_size=250"),
               (P(1, 1, 8), _config(kv=8, inter=300), "intermediate_size",
                "tp=8 does not divide intermediate_size=300"),
               (P(1, 3, 1), cfg, "num_hidden_layers", "pp=3 does not divide 4 layers")]
    for plan, config, name, why in invalid:
        try:
            impl.check_plan(plan, config)
        except ValueError as e:
            assert name in str(e), f"6.1 check_plan({plan}): the ValueError should name {name} ({why}); got: {e}"
        else:
            raise AssertionError(f"6.1 check_plan({plan}) must raise ValueError: {why} ({name}) "
                                 "(labs/capstone/plan.py)")


def check_replica_ranks(impl):
    P = impl.Plan
    for plan in (P(2, 1, 2), P(1, 2, 2), P(3, 1, 1), P(2, 2, 2), P(1, 4, 2)):
        want = [[[d * plan.pp * plan.tp + s * plan.tp + t for t in range(plan.tp)] for s in range(plan.pp)]
                for d in range(plan.dp)]
        got = impl.replica_ranks(plan)
        assert got == want, f"6.1 replica_ranks({plan}): expected {want}, got {got} (result[d][s] = the tp ranks " \
                            "of stage s of replica d; rank = d·pp·tp + s·tp + t) (labs/capstone/plan.py)"


@pytest.mark.exercise("6.1", "check a (dp, pp, tp) plan; ranks of each replica")
def test_plan():
    impl = load_impl("capstone.plan")
    check_plan_rules(impl)
    check_replica_ranks(impl)


# ------------------------------------------------------------------------------------------------ 6.2

ROUTER_CASES = [  # policy, outstanding, turns, expected, what it checks
    ("round_robin", [0, 0, 0], range(6), [0, 1, 2, 0, 1, 2],
     "round_robin takes turns among the replicas up (a replica with 0 outstanding is up; None means down)"),
    ("round_robin", [5, None, 0], range(4), [0, 2, 0, 2],
     "round_robin: the (turn mod k)-th of the k replicas up, in index order (replica 1 is down)"),
    ("least_outstanding", [3, 1, 2], range(3), [1, 1, 1], "least_outstanding: the replica with the fewest"),
    ("least_outstanding", [0, 2], range(2), [0, 0],
     "least_outstanding: replica 0 has 0 outstanding, the fewest (0 outstanding is up, not down)"),
    ("least_outstanding", [1, 4, 1], range(4), [0, 2, 0, 2],
     "least_outstanding ties rotate: the (turn mod k)-th of the k tied replicas"),
    ("least_outstanding", [2, 0, 5, 0, 0], range(6), [1, 3, 4, 1, 3, 4],
     "least_outstanding ties rotate among the 3 tied replicas (1, 3, 4), not among all 5"),
    ("least_outstanding", [None, 9, None], [7], [1],
     "least_outstanding must never choose a replica that is down (None), however busy the others"),
]


def check_router(choose):
    for policy, outstanding, turns, want, what in ROUTER_CASES:
        got = []
        for t in turns:
            try:
                got.append(choose(policy, list(outstanding), t))
            except NotImplementedError:
                raise   # a stub: "not started"
            except Exception as e:
                raise AssertionError(f"6.2 choose_replica({policy!r}, {outstanding}, turn={t}) raised "
                                     f"{type(e).__name__}: {e}. {what} (labs/capstone/router.py)") from None
        assert got == want, f"6.2 choose_replica({policy!r}, {outstanding}) for turns {list(turns)}: expected " \
                            f"{want}, got {got}. {what} (labs/capstone/router.py)"
    for policy, outstanding, what in (("least_outstanding", [None, None], "no replica is up"),
                                      ("round_robin", [None], "no replica is up"),
                                      ("random", [0, 0], "an unknown policy")):
        try:
            got = choose(policy, outstanding, 0)
        except ValueError:
            continue
        except Exception as e:
            raise AssertionError(f"6.2 choose_replica({policy!r}, {outstanding}, 0) must raise ValueError for "
                                 f"{what} (the policy or the replicas), not {type(e).__name__}: {e}") from None
        raise AssertionError(f"6.2 choose_replica({policy!r}, {outstanding}, 0) must raise ValueError for {what} "
                             f"(policy {policy!r}), got {got!r} (labs/capstone/router.py)")


@pytest.mark.exercise("6.2", "round robin and least outstanding requests")
def test_choose_replica():
    check_router(load_impl("capstone.router").choose_replica)


def test_the_server_balances_with_exercise_6_2(monkeypatch, capsys):
    """The balancer holds no rule of its own: without choose= it calls exercise 6.2's choose_replica (from
    COURSE_IMPL), with the outstanding counts of the replicas that are up (None for the others)."""
    from helpers.course.serving import balancer
    from helpers.impl import unwritten_exercises
    monkeypatch.setenv("COURSE_IMPL", "solutions")
    b = balancer.Balancer(ServeConfig(data_parallel_size=3, policy="round_robin"))
    assert b.choose_policy is load_impl("capstone.router").choose_replica
    calls = []
    b.choose_policy = lambda policy, outstanding, turn: calls.append((policy, outstanding, turn)) or 2
    b.replicas[0].state, b.replicas[2].state = "ready", "ready"
    b.replicas[2].inflight = {7: None}
    assert b.choose() is b.replicas[2] and calls == [("round_robin", [0, None, 1], 0)]
    # labs mode with 6.2 still a stub: the reference answer, and one line that says so
    monkeypatch.setenv("COURSE_IMPL", "labs")
    monkeypatch.setenv("COURSE_FALLBACK", "1")              # as in a notebook kernel
    try:
        router = load_impl("capstone.router")
        chosen = balancer.course_router()
        if "choose_replica" in unwritten_exercises(router.__file__):
            assert chosen.__module__ == "solutions.capstone.router"
            assert "Exercise 6.2 not written yet" in capsys.readouterr().out
        else:
            assert chosen is router.choose_replica
    finally:
        # The fallback patches the labs module itself: forget it, so later tests import labs/ as it is on disk.
        sys.modules.pop("labs.capstone.router", None)
        if "labs.capstone" in sys.modules and hasattr(sys.modules["labs.capstone"], "router"):
            delattr(sys.modules["labs.capstone"], "router")
    monkeypatch.setenv("COURSE_FALLBACK", "0")              # as under the grader: never the reference
    assert balancer.course_router() is load_impl("capstone.router").choose_replica
    assert balancer.course_router().__module__ == "labs.capstone.router"


# ------------------------------------------------------------------------------------------------ 6.3

def _metrics_text():
    m = ServingMetrics()
    for seconds in (0.02, 0.03, 0.04, 0.2):
        m.latency.observe(seconds)
    m.requests.labels(endpoint="/v1/completions", status=200).inc(4)
    m.requests.labels(endpoint="/v1/completions", status=400).inc(2)
    m.requests.labels(endpoint="/v1/completions", status=500).inc(1)
    m.requests.labels(endpoint="/metrics", status=200).inc(7)
    m.requests.labels(endpoint="/health", status=503).inc(3)
    m.tokens.inc(64)
    m.busy.labels(replica=0).inc(1.5)
    m.busy.labels(replica=1).inc(0.25)
    return m.exposition().decode()


def check_summarize(summarize):
    text = _metrics_text()
    report = summarize(text)
    where = "(labs/capstone/report.py)"
    assert report["requests"] == 4, f"6.3 requests: expected 4 (serving_requests_total with endpoint " \
        f"/v1/completions and status 200 only; /metrics answered 7 more), got {report['requests']} {where}"
    assert report["errors"] == 3, f"6.3 errors: expected 3 (completions answered 400 ×2 and 500 ×1; the 503s of " \
        f"/health are not completions), got {report['errors']} {where}"
    assert report["tokens"] == 64, \
        f"6.3 tokens: expected 64 (serving_generated_tokens_total), got {report['tokens']} {where}"
    assert report["busy_seconds"] == {0: 1.5, 1: 0.25} and all(type(k) is int for k in report["busy_seconds"]), \
        f"6.3 busy_seconds: expected {{0: 1.5, 1: 0.25}} keyed by the replica index as an int, got " \
        f"{report['busy_seconds']!r} {where}"
    samples = parse(text)
    # float64 interpolation computed in two orders: a few ulps apart, far inside 2^20 eps.
    for q, key in ((0.5, "p50"), (0.99, "p99")):
        want = histogram_quantile(samples, "serving_request_latency_seconds", q)
        assert math.isclose(report[key], want, rel_tol=2**20 * sys.float_info.epsilon), \
            f"6.3 {key}: expected {want:.6g} s (PromQL's " \
            f"histogram_quantile interpolates linearly inside the bucket the rank falls in), got {report[key]!r} " \
            f"{where}"
    empty = summarize("")
    assert empty["requests"] == 0 and empty["errors"] == 0 and math.isnan(empty["p50"]) and math.isnan(empty["p99"]), \
        f"6.3 with no request: requests 0, errors 0 and NaN quantiles expected, got {empty} {where}"


@pytest.mark.exercise("6.3", "a performance report from Prometheus metrics")
def test_summarize():
    check_summarize(load_impl("capstone.report").summarize)


# ------------------------------------------------------------------------------------------- 6.4 - 6.7

class _Recorded(Exception):
    """Raised instead of starting a server, once its options are recorded (dry runs)."""


@contextlib.contextmanager
def watch_servers(start: bool):
    """Record every ServerProcess built inside (what start_server builds): a list of (instance, options), the
    options being the fields of its ServeConfig (vLLM's names: data_parallel_size, tensor_parallel_size, ...).
    start=False: record and raise _Recorded instead of starting it; start=True: record and start it."""
    original = background.ServerProcess.__init__
    started = []

    def init(self, *args, **kwargs):
        bound = inspect.signature(original).bind(self, *args, **kwargs)
        started.append((self, dataclasses.asdict(bound.arguments["config"])))
        if not start:
            raise _Recorded()
        original(self, *args, **kwargs)

    background.ServerProcess.__init__ = init
    try:
        yield started
    finally:
        background.ServerProcess.__init__ = original


def check_engine_init(engine_cls, plan_cls):
    with watch_servers(start=False) as started:
        try:
            engine_cls(plan_cls(dp=1, pp=1, tp=3))
        except ValueError:
            pass
        except _Recorded:
            raise AssertionError("6.4 CapstoneServer.__init__ must check the plan and start nothing yet: it "
                                 "started a server (labs/capstone/engine.py)") from None
        else:
            raise AssertionError("6.4 CapstoneServer(Plan(tp=3)) must raise check_plan's ValueError in __init__ "
                                 "(tp=3 does not divide the 8 heads); it raised nothing (labs/capstone/engine.py)")
        try:
            engine_cls(plan_cls(dp=2, pp=1, tp=1), policy="round_robin")
        except _Recorded:
            pass
        assert not started, "6.4 CapstoneServer.__init__ must start nothing yet (start() or `with` does): " \
                            "it started a server (labs/capstone/engine.py)"


def check_engine_wiring(engine_cls, plan_cls, plan_args, policy, choose_spec):
    plan = plan_cls(*plan_args)
    engine = engine_cls(plan, policy=policy, batching="static", max_batch=4)
    with watch_servers(start=False) as started:
        try:
            engine.start()
        except _Recorded:
            pass
    assert len(started) == 1, \
        f"6.4 start() for {plan} must start one server with helpers.course.serving.start_server; " \
        f"it started {len(started)} (labs/capstone/engine.py)"
    options = started[0][1]
    want = {"replicas": plan.dp, "tp": plan.tp, "pp": plan.pp, "policy": policy, "batching": "static",
            "max_batch": 4, "choose": choose_spec}
    for name, value_wanted in want.items():
        field = ALIASES.get(name, name)
        also = f" ({field}=)" if field != name else ""
        assert options[field] == value_wanted, f"6.4 start() for {plan}, policy={policy!r}: start_server " \
            f"option {name}={options[field]!r}{also}, expected {value_wanted!r} (labs/capstone/engine.py)"


def check_engine_policies(engine_cls, plan_cls, plan_args, choose_spec):
    """check_engine_wiring under both routing policies: an engine that passes its default policy whatever it is
    given (`policy` ignored) would pass a check that asks only for the default."""
    for policy in ("least_outstanding", "round_robin"):
        check_engine_wiring(engine_cls, plan_cls, plan_args, policy, choose_spec)


KV_CACHE = {"kv_cache": "paged", "enable_prefix_caching": True, "max_num_batched_tokens": 32, "block_size": 16}
SYSTEM_PROMPT = "You are a careful assistant. Answer in one short sentence, and say so when unsure. "


def check_engine_kv_wiring(engine_cls, plan_cls):
    """6.7, a dry run: CapstoneServer(plan, kv_cache={...}).start() passes every option to start_server."""
    try:
        engine = engine_cls(plan_cls(1, 1, 1), kv_cache=dict(KV_CACHE))
    except TypeError as e:
        raise AssertionError(f"6.7 CapstoneServer(plan, kv_cache={{...}}) raised {e}: add the kv_cache argument "
                             "to __init__ (labs/capstone/engine.py)") from None
    with watch_servers(start=False) as started:
        try:
            engine.start()
        except _Recorded:
            pass
    assert len(started) == 1, f"6.7 start() must start one server, it started {len(started)}"
    options = started[0][1]
    for name, value_wanted in KV_CACHE.items():
        assert options[name] == value_wanted, f"6.7 start() with kv_cache={KV_CACHE}: start_server option " \
            f"{name}={options[name]!r}, expected {value_wanted!r}: pass the kv_cache options on " \
            "(start_server(..., **kv_cache); labs/capstone/engine.py)"


def check_paged_serving(engine, server, model):
    """6.7, live: prompts sharing a system prompt, served from the paged cache with prefix caching, give the
    unsharded model's greedy tokens; the server's own counters show the paged engine ran and the shared
    prompt's blocks were found in the prefix cache (all but the first request's)."""
    prompts = [SYSTEM_PROMPT + p for p in PROMPTS]
    try:
        results = engine.generate(prompts, max_tokens=MAX_TOKENS)
    except Exception as e:
        detail = getattr(e, "read", lambda: b"")().decode(errors="replace")
        raise AssertionError(f"6.7 the paged server failed a request: {e} {detail} (the paged engine runs "
                             "exercises 7.1-7.4: write those first)") from None
    for prompt, got in zip(prompts, results):
        want = tiny_llama.generate(model, tiny_llama.encode(prompt), MAX_TOKENS)
        assert got["tokens"] == want, f"6.7 {prompt!r}: the paged server's tokens {got['tokens']} differ from " \
            f"the model's {want}"
    time.sleep(0.3)   # the replica reports its counters just after its last answer
    scraped = parse(server.get("/metrics"))
    queries = value(scraped, "serving_prefix_cache_queries_total")
    hits = value(scraped, "serving_prefix_cache_hits_total")
    asked = sum(len(tiny_llama.encode(p)) for p in prompts)
    shared = len(tiny_llama.encode(SYSTEM_PROMPT)) // KV_CACHE["block_size"] * KV_CACHE["block_size"]
    assert queries == asked, f"6.7 the server looked up {queries:.0f} prompt tokens in its prefix cache, " \
        f"the {len(prompts)} prompts hold {asked}: it did not serve from the paged cache with prefix caching"
    assert (len(prompts) - 1) * shared <= hits < asked, f"6.7 prefix cache hits {hits:.0f} of {asked} tokens: " \
        f"every request after the first should find the system prompt's {shared} tokens of full blocks"


def _replica_steps(server):
    time.sleep(0.3)   # a replica reports its counters just after its last answer
    return sum(r.get("steps", 0) for r in server.replicas())


def _answered(server):
    return value(parse(server.get("/metrics")), "serving_requests_total", endpoint="/v1/completions", status=200)


def check_generate(engine, server, reference, dp, pp=1):
    """The engine's generate against its live server: tokens, replicas, concurrency, and its report."""
    before_steps, before_answered = _replica_steps(server), _answered(server)
    results = engine.generate(PROMPTS, max_tokens=MAX_TOKENS)
    assert len(results) == len(PROMPTS), f"6.4 generate: {len(PROMPTS)} results expected, got {len(results)}"
    for prompt, got in zip(PROMPTS, results):
        assert got["tokens"] == reference[prompt], f"6.4 generate, {prompt!r}: served tokens {got['tokens']} " \
            f"differ from the unsharded model's {reference[prompt]} (greedy, max_tokens={MAX_TOKENS}, in prompt order)"
    replicas = {}
    for r in results:
        replicas[r["replica"]] = replicas.get(r["replica"], 0) + 1
    assert set(replicas) == set(range(dp)), f"6.4 generate: the answers name replicas {replicas} while the " \
        f"{dp} replica(s) served them: read each answer's X-Replica header (labs/capstone/engine.py)"
    steps = _replica_steps(server) - before_steps
    one_at_a_time = len(PROMPTS) * (MAX_TOKENS - 1)   # a pp replica counts engine batches, as pp = 1 decode steps
    unit = "batches" if pp > 1 else "decode steps"
    assert steps < 0.75 * one_at_a_time, f"6.4 generate: the replicas ran {steps} {unit} " \
        f"for {len(PROMPTS)} prompts; one at a time takes {one_at_a_time}. Send them concurrently (one thread " \
        "per prompt) so that they share batches (labs/capstone/engine.py)"
    report = engine.report()
    answered = _answered(server)
    assert answered - before_answered == len(PROMPTS) and report["requests"] == answered, \
        f"6.4 report(): requests {report['requests']}, the server's counter says {answered} (summarize the " \
        "scraped /metrics with exercise 6.3)"
    assert set(report["busy_seconds"]) == set(range(dp)) and all(v > 0 for v in report["busy_seconds"].values()), \
        f"6.4 report(): busy_seconds {report['busy_seconds']} should have every replica, busy"


def check_least_outstanding_steers(engine, server):
    """A long request keeps one replica busy; one-token requests sent meanwhile must go to the other."""
    box = {}
    long_request = threading.Thread(target=lambda: box.update(r=engine.generate([PROMPTS[0]], max_tokens=200)))
    long_request.start()
    try:
        deadline = time.monotonic() + 30
        busy = []
        while not busy and time.monotonic() < deadline:
            busy = [r["index"] for r in server.replicas() if r["outstanding"] > 0]
            time.sleep(0.005)
        assert busy, "6.4: a 200-token request never showed as outstanding on a replica"
        for _ in range(3):
            short = engine.generate(["A"], max_tokens=1)[0]
            still_busy = any(r["index"] == busy[0] and r["outstanding"] > 0 for r in server.replicas())
            if still_busy:
                assert short["replica"] != busy[0], f"6.4 least_outstanding: replica {busy[0]} holds a long " \
                    f"request, the other none, yet a new request went to replica {busy[0]}: the router " \
                    "(exercise 6.2, plugged in with choose=) must steer it to the least loaded replica"
    finally:
        long_request.join(60)


def check_stop_twice(engine):
    engine.stop()
    try:
        engine.stop()
    except Exception as e:
        raise AssertionError(f"6.4 stop() must be safe to call twice; the second call raised "
                             f"{type(e).__name__}: {e} (labs/capstone/engine.py)") from None


def check_stop(engine, server):
    pids = [server.process.pid] + [r["pid"] for r in server.replicas() if r["pid"]]
    check_stop_twice(engine)
    left = proctree.wait_gone(pids, timeout=10)
    assert not left, f"6.4 stop(): processes {left} of the server (front end {pids[0]}, replicas {pids[1:]}) are " \
                     "still running: stop the server (ServerProcess.stop) (labs/capstone/engine.py)"


def _serve_live(plan_args, reference, policy, steer=False):
    impl, plan = load_impl("capstone.engine"), load_impl("capstone.plan")
    choose_spec = f"{impl.PACKAGE}.router:choose_replica"
    check_engine_policies(impl.CapstoneServer, plan.Plan, plan_args, choose_spec)
    engine = impl.CapstoneServer(plan.Plan(*plan_args), policy=policy)
    with watch_servers(start=True) as started:
        engine.start()
    assert len(started) == 1, f"6.4 start() must start one server, it started {len(started)}"
    server = started[0][0]
    try:
        if steer:
            check_least_outstanding_steers(engine, server)
        check_generate(engine, server, reference, dp=plan_args[0], pp=plan_args[1])
        check_stop(engine, server)
    finally:
        server.stop()


@pytest.mark.exercise("6.7", "CapstoneServer on chapter 7's paged KV cache: prefix caching and chunked prefill")
def test_engine_paged_kv_cache():
    impl, plan = load_impl("capstone.engine"), load_impl("capstone.plan")
    check_engine_kv_wiring(impl.CapstoneServer, plan.Plan)
    model = tiny_llama.load_model()
    engine = impl.CapstoneServer(plan.Plan(1, 1, 1), kv_cache=dict(KV_CACHE))
    with watch_servers(start=True) as started:
        engine.start()
    server = started[0][0]
    try:
        check_paged_serving(engine, server, model)
        check_stop(engine, server)
    finally:
        server.stop()


@pytest.mark.exercise("6.4", "CapstoneServer: dp=2 replicas serve the unsharded model's tokens, balanced, measured")
def test_engine_data_parallel(reference):
    impl, plan = load_impl("capstone.engine"), load_impl("capstone.plan")
    check_engine_init(impl.CapstoneServer, plan.Plan)
    _serve_live((2, 1, 1), reference, "least_outstanding", steer=True)


@pytest.mark.exercise("6.5", "CapstoneServer with tensor-parallel replicas (chapter 2's shard_llama)")
def test_engine_tensor_parallel(reference):
    _serve_live((1, 1, 2), reference, "least_outstanding")


@pytest.mark.exercise("6.6", "pipeline-parallel plan: pp=2 stages serve the unsharded model's tokens")
def test_engine_pipeline_parallel(reference):
    _serve_live((1, 2, 1), reference, "least_outstanding")


# ------------------------------------------------------------------------ planted mistakes (not graded)

def _planted():
    from tests.graders import planted_ch06 as p
    return p


def _caught(check, name, fragment):
    with pytest.raises(AssertionError) as caught:
        check()
    assert_caught(mistake("6", name, name, (fragment,)), caught.value)


@pytest.mark.parametrize("name", list(_planted().WRONG_PLANS))
def test_planted_plans_are_caught(name):
    impl, fragment = _planted().WRONG_PLANS[name]
    _caught(lambda: (check_plan_rules(impl), check_replica_ranks(impl)), name, fragment)


@pytest.mark.parametrize("name", list(_planted().VALID_PLANS))
def test_valid_plans_pass(name):
    impl = _planted().VALID_PLANS[name]
    check_plan_rules(impl)
    check_replica_ranks(impl)


@pytest.mark.parametrize("name", list(_planted().WRONG_ROUTERS))
def test_planted_routers_are_caught(name):
    choose, fragment = _planted().WRONG_ROUTERS[name]
    _caught(lambda: check_router(choose), name, fragment)


@pytest.mark.parametrize("name", list(_planted().VALID_ROUTERS))
def test_valid_routers_pass(name):
    check_router(_planted().VALID_ROUTERS[name])


@pytest.mark.parametrize("name", list(_planted().WRONG_REPORTS))
def test_planted_reports_are_caught(name):
    summarize, fragment = _planted().WRONG_REPORTS[name]
    _caught(lambda: check_summarize(summarize), name, fragment)


@pytest.mark.parametrize("name", list(_planted().VALID_REPORTS))
def test_valid_reports_pass(name):
    check_summarize(_planted().VALID_REPORTS[name])


@pytest.fixture(scope="module")
def shared_server():
    """One live server (dp=2, the balancer's own policy) for the planted engines' generate checks."""
    from helpers.course.serving import start_server
    with start_server(replicas=2) as server:
        yield server


class _StoppableServer:
    def __init__(self):
        self.stops = 0

    def stop(self):
        self.stops += 1


def _engine_checks(cls, group, reference, server):
    p = _planted()
    if group == "init":
        check_engine_init(cls, p.Plan)
    elif group == "wiring":
        for plan_args in ((2, 1, 1), (1, 1, 2), (1, 2, 1)):    # the plans of 6.4, 6.5 and 6.6, as they check them
            check_engine_policies(cls, p.Plan, plan_args, f"{p.ROUTER_PACKAGE}.router:choose_replica")
    elif group == "live":
        engine = cls(p.Plan(2, 1, 1))
        engine.server = server   # a planted engine talks to the shared server; the grader watches the same one
        check_generate(engine, server, reference, dp=2)
    elif group == "stop":
        engine = cls(p.Plan(2, 1, 1))
        engine.server = _StoppableServer()
        check_stop_twice(engine)
    elif group == "kv":
        check_engine_kv_wiring(cls, p.Plan)


@pytest.mark.parametrize("name", list(_planted().WRONG_ENGINES))
def test_planted_engines_are_caught(name, reference, request):
    cls, group, fragment = _planted().WRONG_ENGINES[name]
    server = request.getfixturevalue("shared_server") if group == "live" else None
    _caught(lambda: _engine_checks(cls, group, reference, server), name, fragment)


@pytest.mark.parametrize("name", list(_planted().VALID_ENGINES))
def test_valid_engines_pass(name, reference, shared_server):
    cls = _planted().VALID_ENGINES[name]
    for group in ("init", "wiring", "live", "stop", "kv"):
        _engine_checks(cls, group, reference, shared_server)


# ------------------------------------------------------------- the chapter's measuring tools (not graded)

def test_replay_schedule_is_the_real_models():
    """The virtual-clock replay gives the same timestamps with ScheduleOnlyLM as with the tiny Llama, and the
    real model's tokens; static batching answers a batch together; TTFT ≤ latency for every request."""
    from helpers.course.serving.device_time import DeviceCost, ScheduleOnlyLM
    from helpers.course.serving.loadtest import poisson_arrivals, replay
    ids = tiny_llama.encode(PROMPTS[0])
    arrivals, lengths = poisson_arrivals(30, 8, seed=3), [2, 5, 3]
    model = tiny_llama.load_model()
    want = tiny_llama.generate(model, ids, max(lengths))
    for batching in ("none", "static", "continuous"):
        real = replay(model, batching, arrivals, lengths, ids)
        shapes = replay(ScheduleOnlyLM(), batching, arrivals, lengths, ids)
        assert [r["token_times"] for r in real.records] == [r["token_times"] for r in shapes.records], batching
        assert [r["finished"] for r in real.records] == [r["finished"] for r in shapes.records], batching
        for r in real.records:
            assert r["tokens"] == want[:len(r["tokens"])], f"{batching}: request {r['i']} got other tokens"
            assert r["arrival"] <= r["token_times"][0] <= r["token_times"][-1] <= r["finished"], (batching, r)
    with pytest.raises(ValueError, match="decode_ms"):
        DeviceCost(decode_ms=-1)
    with pytest.raises(ValueError, match="increasing"):
        replay(ScheduleOnlyLM(), "none", [1.0, 0.5], lengths, ids)
