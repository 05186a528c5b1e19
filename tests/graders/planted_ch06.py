"""Wrong answers to chapter 6's capstone exercises, planted to prove that the graders catch them, and valid
alternatives that the graders must accept. Not graded themselves: tests/graders/test_ch06_serving.py runs its
grading checks on each of them (test_planted_*_are_caught, test_valid_*_pass).

Each wrong variant is self-contained (it imports neither labs/ nor solutions/) and computes plausible
results the wrong way; its docstring says what is wrong. Each table maps a name to (variant, a fragment the
grader's failure message must contain: the message must point at the bug).
"""
import json
import math
import types
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from helpers.course.serving import start_server
from helpers.course.serving.metrics import histogram_quantile, parse

ROUTER_PACKAGE = "labs.capstone"   # what a planted engine plugs in: never started by the plant checks


# --------------------------------------------------------------------------------------- 6.1 plan

@dataclass(frozen=True)
class Plan:
    dp: int = 1
    pp: int = 1
    tp: int = 1


def _check_plan(plan, config, *, bools=False, floats=False, kv="either", fields=("num_attention_heads",
                "intermediate_size", "vocab_size"), layers=True):
    for name in ("dp", "pp", "tp"):
        v = getattr(plan, name)
        if (isinstance(v, bool) and not bools) or (not isinstance(v, int) and not (floats and isinstance(v, float))) \
                or v < 1:
            raise ValueError(f"{name}={v!r}: every degree of a plan is a whole number >= 1")
    tp = plan.tp
    for field in fields:
        if getattr(config, field) % tp:
            raise ValueError(f"tp={tp} does not divide {field}={getattr(config, field)}")
    heads = config.num_key_value_heads
    if kv == "either" and heads % tp and tp % heads:
        raise ValueError(f"tp={tp} neither divides nor is a multiple of num_key_value_heads={heads}")
    if kv == "divide" and heads % tp:
        raise ValueError(f"tp={tp} does not divide num_key_value_heads={heads}")
    if layers and config.num_hidden_layers % plan.pp:
        raise ValueError(f"pp={plan.pp} does not divide num_hidden_layers={config.num_hidden_layers}")
    return plan


def _ranks(plan):
    return [[[d * plan.pp * plan.tp + s * plan.tp + t for t in range(plan.tp)] for s in range(plan.pp)]
            for d in range(plan.dp)]


def _plan_impl(check_plan=None, replica_ranks=None):
    return types.SimpleNamespace(Plan=Plan, check_plan=check_plan or (lambda p, c: _check_plan(p, c)),
                                 replica_ranks=replica_ranks or _ranks)


def plan_accepts_bool(plan, config):
    """WRONG: True passes as 1 (bool is an int subclass); the docstring says bool is not a number here."""
    return _check_plan(plan, config, bools=True)


def plan_accepts_float(plan, config):
    """WRONG: dp=2.0 accepted: degrees must be whole numbers (ints)."""
    return _check_plan(plan, config, floats=True)


def plan_without_kv_rule(plan, config):
    """WRONG: no check of num_key_value_heads: tp=3 on 8 KV heads passes (chapter 2's attention cannot
    split 8 heads over 3 ranks, nor copy them evenly)."""
    return _check_plan(plan, config, kv=None)


def plan_kv_must_divide(plan, config):
    """WRONG: requires tp to divide the KV heads, refusing tp=4 on 2 KV heads, which chapter 2 serves by
    copying each KV head to 2 ranks."""
    return _check_plan(plan, config, kv="divide")


def plan_without_vocab_rule(plan, config):
    """WRONG: vocab_size is not checked (the vocab-parallel embedding and lm_head need tp | vocab_size)."""
    return _check_plan(plan, config, fields=("num_attention_heads", "intermediate_size"))


def plan_without_mlp_rule(plan, config):
    """WRONG: intermediate_size is not checked (the column-parallel MLP needs tp | intermediate_size)."""
    return _check_plan(plan, config, fields=("num_attention_heads", "vocab_size"))


def plan_without_pp_rule(plan, config):
    """WRONG: pp is never checked against num_hidden_layers."""
    return _check_plan(plan, config, layers=False)


def plan_returns_none(plan, config):
    """WRONG: checks, but returns None instead of the plan."""
    _check_plan(plan, config)


def ranks_tp_major(plan):
    """WRONG: tensor-parallel peers strided by dp·pp (rank = t·dp·pp + d·pp + s): a TP group's all-reduces,
    the most frequent traffic, then cross the slowest links."""
    return [[[t * plan.dp * plan.pp + d * plan.pp + s for t in range(plan.tp)] for s in range(plan.pp)]
            for d in range(plan.dp)]


def ranks_stage_major(plan):
    """WRONG: result[d][t] lists the pipeline stages of TP rank t: stages and tp ranks swapped."""
    return [[[d * plan.pp * plan.tp + s * plan.tp + t for s in range(plan.pp)] for t in range(plan.tp)]
            for d in range(plan.dp)]


WRONG_PLANS = {
    "bool accepted": (_plan_impl(check_plan=plan_accepts_bool), "bool"),
    "float accepted": (_plan_impl(check_plan=plan_accepts_float), "whole number"),
    "no KV-head rule": (_plan_impl(check_plan=plan_without_kv_rule), "num_key_value_heads"),
    "KV heads must be divided": (_plan_impl(check_plan=plan_kv_must_divide), "multiple of"),
    "no vocab rule": (_plan_impl(check_plan=plan_without_vocab_rule), "vocab_size"),
    "no intermediate rule": (_plan_impl(check_plan=plan_without_mlp_rule), "intermediate_size"),
    "no pp rule": (_plan_impl(check_plan=plan_without_pp_rule), "num_hidden_layers"),
    "returns None": (_plan_impl(check_plan=plan_returns_none), "return the plan"),
    "tp-major ranks": (_plan_impl(replica_ranks=ranks_tp_major), "replica_ranks"),
    "stages and tp swapped": (_plan_impl(replica_ranks=ranks_stage_major), "replica_ranks"),
}

VALID_PLANS = {"reference rules": _plan_impl()}


# --------------------------------------------------------------------------------------- 6.2 router

def _up(outstanding, falsy=False):
    return [i for i, n in enumerate(outstanding) if (n if falsy else n is not None)]


def _choose(policy, outstanding, turn, *, fewest=min, ties="rotate", rr="up", falsy=False, unknown="raise",
            down_as_zero=False):
    if down_as_zero:
        outstanding = [0 if n is None else n for n in outstanding]
    up = _up(outstanding, falsy)
    if not up:
        raise ValueError("no replica is up")
    if policy == "round_robin" or (unknown == "round_robin" and policy != "least_outstanding"):
        if rr == "all":
            i = turn % len(outstanding)
            while outstanding[i] is None:
                i = (i + 1) % len(outstanding)
            return i
        return up[turn % len(up)]
    if policy != "least_outstanding":
        raise ValueError(f"policy={policy!r}")
    best = fewest(outstanding[i] for i in up)
    tied = [i for i in up if outstanding[i] == best]
    if ties == "first":
        return tied[0]
    if ties == "by_up":
        return tied[(turn % len(up)) % len(tied)]
    return tied[turn % len(tied)]


def _router(**options):
    return lambda policy, outstanding, turn: _choose(policy, outstanding, turn, **options)


def choose_by_sorting(policy, outstanding, turn):
    """VALID: least outstanding by sorting (count, index), ties rotated among the tied."""
    up = [i for i, n in enumerate(outstanding) if n is not None]
    if not up:
        raise ValueError("no replica is up")
    if policy == "round_robin":
        return sorted(up)[turn % len(up)]
    if policy == "least_outstanding":
        order = sorted(up, key=lambda i: (outstanding[i], i))
        tied = [i for i in order if outstanding[i] == outstanding[order[0]]]
        return tied[turn % len(tied)]
    raise ValueError(f"unknown policy {policy!r}")


WRONG_ROUTERS = {
    "most outstanding": (_router(fewest=max), "least_outstanding"),
    "ties always first": (_router(ties="first"), "ties"),
    "ties rotated over replicas up": (_router(ties="by_up"), "ties"),
    "round robin over all replicas": (_router(rr="all"), "round_robin"),
    "a down replica counts as idle": (_router(down_as_zero=True), "down"),
    "0 outstanding taken for down": (_router(falsy=True), "0 outstanding"),
    "unknown policy served round robin": (_router(unknown="round_robin"), "policy"),
}

VALID_ROUTERS = {"sorted by (count, index)": choose_by_sorting}


# --------------------------------------------------------------------------------------- 6.3 report

def _summarize(text, *, all_endpoints=False, errors_400_only=False, errors_any_endpoint=False, str_keys=False,
               quantile="promql"):
    samples = parse(text)
    ok = errors = 0.0
    busy = {}
    for (name, labels), v in samples.items():
        labels = dict(labels)
        if name == "serving_requests_total":
            completions = labels.get("endpoint") == "/v1/completions"
            if labels.get("status") == "200":
                ok += v if (completions or all_endpoints) else 0
            elif completions or errors_any_endpoint:
                errors += v if (not errors_400_only or labels.get("status") == "400") else 0
        elif name == "serving_replica_busy_seconds_total":
            busy[labels["replica"] if str_keys else int(labels["replica"])] = v
    if quantile == "promql":
        p50, p99 = (histogram_quantile(samples, "serving_request_latency_seconds", q) for q in (0.5, 0.99))
    else:  # the upper bound of the bucket the quantile falls in: no interpolation
        buckets = sorted((float(dict(l)["le"]), c) for (n, l), c in samples.items()
                         if n == "serving_request_latency_seconds_bucket")
        total = buckets[-1][1] if buckets else 0
        p50, p99 = ((next(le for le, c in buckets if c >= q * total) if total else math.nan) for q in (0.5, 0.99))
    return {"requests": int(ok), "errors": int(errors),
            "tokens": int(samples.get(("serving_generated_tokens_total", frozenset()), 0)),
            "busy_seconds": busy, "p50": p50, "p99": p99}


def _report(**options):
    return lambda text: _summarize(text, **options)


def summarize_with_prometheus_parser(text):
    """VALID: prometheus_client's parser directly, the interpolation written out."""
    from prometheus_client.parser import text_string_to_metric_families
    requests = errors = tokens = 0
    busy, buckets = {}, []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "serving_requests_total" and s.labels.get("endpoint") == "/v1/completions":
                if s.labels["status"] == "200":
                    requests += int(s.value)
                else:
                    errors += int(s.value)
            elif s.name == "serving_generated_tokens_total":
                tokens = int(s.value)
            elif s.name == "serving_replica_busy_seconds_total":
                busy[int(s.labels["replica"])] = s.value
            elif s.name == "serving_request_latency_seconds_bucket":
                buckets.append((float(s.labels["le"]), s.value))
    buckets.sort()

    def quantile(q):
        if not buckets or buckets[-1][1] == 0:
            return math.nan
        rank, lo, below = q * buckets[-1][1], 0.0, 0.0
        for le, count in buckets:
            if count >= rank:
                return lo if le == math.inf else lo + (le - lo) * (rank - below) / (count - below)
            lo, below = le, count
        return lo

    return {"requests": requests, "errors": errors, "tokens": tokens, "busy_seconds": busy,
            "p50": quantile(0.5), "p99": quantile(0.99)}


WRONG_REPORTS = {
    "requests of every endpoint": (_report(all_endpoints=True), "requests"),
    "errors of every endpoint": (_report(errors_any_endpoint=True), "errors"),
    "only 400s are errors": (_report(errors_400_only=True), "errors"),
    "replica labels kept as strings": (_report(str_keys=True), "busy_seconds"),
    "bucket bound, not interpolated": (_report(quantile="bucket"), "interpolat"),
}

VALID_REPORTS = {"prometheus_client parser": summarize_with_prometheus_parser}


# --------------------------------------------------------------------------------------- 6.4-6.7 engine

class GoodEngine:
    """A correct CapstoneServer, self-contained: the base of the wrong variants below."""

    check = staticmethod(lambda plan, config: _check_plan(plan, config))

    def __init__(self, plan, policy="least_outstanding", batching="continuous", max_batch=8, kv_cache=None):
        from helpers.course.tiny_llama import CONFIG
        self.check(plan, CONFIG)
        self.plan, self.policy, self.batching, self.max_batch = plan, policy, batching, max_batch
        self.kv_cache = dict(kv_cache or {})
        self.server = None

    def start(self):
        self.server = start_server(replicas=self.plan.dp, pp=self.plan.pp, tp=self.plan.tp, batching=self.batching,
                                   max_batch=self.max_batch, policy=self.policy,
                                   choose=f"{ROUTER_PACKAGE}.router:choose_replica", **self.kv_cache)
        return self

    def _one(self, prompt, max_tokens):
        body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                           "return_token_ids": True}).encode()
        request = urllib.request.Request(self.server.url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            reply = json.loads(response.read())
            return {"tokens": reply["choices"][0]["token_ids"], "replica": int(response.headers["X-Replica"])}

    def generate(self, prompts, max_tokens=16):
        with ThreadPoolExecutor(max_workers=min(16, max(1, len(prompts)))) as pool:
            return list(pool.map(lambda p: self._one(p, max_tokens), prompts))

    def report(self):
        return _summarize(self.server.get("/metrics"))

    def stop(self):
        if self.server is not None:
            self.server.stop()
            self.server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class EngineUncheckedPlan(GoodEngine):
    """WRONG: the plan is not checked in __init__: tp=3 fails only later, inside the server's replicas."""
    check = staticmethod(lambda plan, config: plan)


class EngineStartsInInit(GoodEngine):
    """WRONG: __init__ starts the server (the docstring: start nothing yet; `with` or start() does)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start()


class EngineIgnoresDp(GoodEngine):
    """WRONG: always one replica (plan.dp ignored)."""

    def start(self):
        self.plan = Plan(1, self.plan.pp, self.plan.tp)
        return super().start()


class EngineIgnoresTp(GoodEngine):
    """WRONG: tp never reaches the server: every replica runs the whole model on one rank (same tokens)."""

    def start(self):
        self.server = start_server(replicas=self.plan.dp, pp=self.plan.pp, batching=self.batching,
                                   max_batch=self.max_batch, policy=self.policy,
                                   choose=f"{ROUTER_PACKAGE}.router:choose_replica")
        return self


class EngineIgnoresPp(GoodEngine):
    """WRONG: pp never reaches the server: no pipeline (same tokens)."""

    def start(self):
        self.server = start_server(replicas=self.plan.dp, tp=self.plan.tp, batching=self.batching,
                                   max_batch=self.max_batch, policy=self.policy,
                                   choose=f"{ROUTER_PACKAGE}.router:choose_replica")
        return self


class EngineWithoutRouter(GoodEngine):
    """WRONG: the learner's router is never plugged in (no `choose`): the balancer's own policy runs."""

    def start(self):
        self.server = start_server(replicas=self.plan.dp, pp=self.plan.pp, tp=self.plan.tp, batching=self.batching,
                                   max_batch=self.max_batch, policy=self.policy)
        return self


class EngineIgnoresPolicy(GoodEngine):
    """WRONG: the policy argument never reaches the server (always least outstanding)."""

    def start(self):
        self.policy = "least_outstanding"
        return super().start()


class EngineSequential(GoodEngine):
    """WRONG: sends the prompts one after another: right tokens, no batching, no balancing of concurrent load."""

    def generate(self, prompts, max_tokens=16):
        return [self._one(p, max_tokens) for p in prompts]


class EngineConstantReplica(GoodEngine):
    """WRONG: reports replica 0 for every answer instead of the X-Replica header."""

    def generate(self, prompts, max_tokens=16):
        return [dict(r, replica=0) for r in super().generate(prompts, max_tokens)]


class EngineIgnoresMaxTokens(GoodEngine):
    """WRONG: always asks for 16 tokens."""

    def generate(self, prompts, max_tokens=16):
        return super().generate(prompts, 16)


class EngineStopTwiceFails(GoodEngine):
    """WRONG: stop() is not safe to call twice (the second call fails on the server already gone)."""

    def stop(self):
        self.server.stop()
        self.server = None


class EngineDropsKvCache(GoodEngine):
    """WRONG (6.7): kv_cache is accepted and never reaches the server: the contiguous cache serves (same tokens)."""

    def start(self):
        self.kv_cache = {}
        return super().start()


class EngineOnlyPaged(GoodEngine):
    """WRONG (6.7): only the first option is passed on (a paged cache, but no prefix caching, no chunking)."""

    def start(self):
        self.kv_cache = dict(list(self.kv_cache.items())[:1])
        return super().start()


# (variant, the check group that must catch it, message fragment)
WRONG_ENGINES = {
    "plan not checked": (EngineUncheckedPlan, "init", "ValueError"),
    "server started in __init__": (EngineStartsInInit, "init", "start nothing"),
    "dp ignored": (EngineIgnoresDp, "wiring", "option replicas="),
    "tp ignored": (EngineIgnoresTp, "wiring", "option tp="),
    "pp ignored": (EngineIgnoresPp, "wiring", "option pp="),
    "router not plugged in": (EngineWithoutRouter, "wiring", "option choose="),
    "policy ignored": (EngineIgnoresPolicy, "wiring", "option policy="),
    "prompts sent one at a time": (EngineSequential, "live", "concurrent"),
    "replica index not from X-Replica": (EngineConstantReplica, "live", "X-Replica"),
    "max_tokens ignored": (EngineIgnoresMaxTokens, "live", "tokens"),
    "stop twice fails": (EngineStopTwiceFails, "stop", "twice"),
    "kv_cache options dropped": (EngineDropsKvCache, "kv", "option kv_cache="),
    "only the first kv_cache option": (EngineOnlyPaged, "kv", "option enable_prefix_caching="),
}

VALID_ENGINES = {"reference engine": GoodEngine}
