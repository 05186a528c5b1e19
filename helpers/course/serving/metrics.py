"""The server's Prometheus metrics, from the official client library (prometheus-client).

Names follow Prometheus conventions (`_seconds`, `_total`); vLLM's own server exports the same kinds of
series under `vllm:` (e.g. `vllm:e2e_request_latency_seconds`, `vllm:num_requests_waiting`,
`vllm:generation_tokens_total`). Scrape them from `GET /metrics`; `parse(text)` reads them back.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class ServingMetrics:
    """One registry per server (not the library's global one), so tests can run several servers."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.latency = Histogram("serving_request_latency_seconds", "Time from request received to response "
                                 "sent, successful completions only", buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("serving_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.tokens = Counter("serving_generated_tokens", "Completion tokens returned to clients", registry=r)
        self.queue_depth = Gauge("serving_queue_depth", "Requests waiting to join a batch, per replica "
                                 "('balancer': waiting for any replica to be up)", ["replica"], registry=r)
        self.running = Gauge("serving_running_sequences", "Sequences in the decode batch", ["replica"], registry=r)
        self.outstanding = Gauge("serving_outstanding_requests", "Requests sent to a replica and not yet "
                                 "answered (what least-outstanding balancing compares)", ["replica"], registry=r)
        self.busy = Counter("serving_replica_busy_seconds", "Seconds a replica spent computing", ["replica"],
                            registry=r)
        self.up = Gauge("serving_replica_up", "1 when the replica accepts work", ["replica"], registry=r)
        self.retries = Counter("serving_retries", "Requests re-sent to another replica after a failure", registry=r)
        self.restarts = Counter("serving_replica_restarts", "Replica processes restarted after dying", registry=r)
        self.spawn_failures = Counter("serving_replica_spawn_failures", "Replica processes that could not be "
                                      "started (fork or pipe failed, e.g. EMFILE); each is retried with backoff",
                                      registry=r)
        self.ttft = Histogram("serving_time_to_first_token_seconds", "Time from a request reaching the front end "
                              "to its first token there (vllm:time_to_first_token_seconds)", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.tpot = Histogram("serving_time_per_output_token_seconds", "(last token - first token) / (tokens - 1) "
                              "at the front end, finished requests of 2 tokens or more "
                              "(vllm:time_per_output_token_seconds)", buckets=TOKEN_BUCKETS, registry=r)
        self.disconnects = Counter("serving_client_disconnects", "Requests cancelled because the client left",
                                   registry=r)

        # A paged replica's KV cache (helpers/course/engine's KVCacheManager, its kv_stats()), under vLLM's names
        self.kv_usage = Gauge("serving_kv_cache_usage_perc", "Fraction of the KV cache's blocks in use, per replica "
                              "(vllm:kv_cache_usage_perc)", ["replica"], registry=r)
        # vLLM's definition: tokens looked up as a request is admitted; a preempted request's re-admission is not
        # counted here (the engine keeps it apart, as vLLM's preempted_queries / preempted_hits)
        self.prefix_queries = Counter("serving_prefix_cache_queries", "Tokens looked up in the prefix cache at "
                                      "admission (vllm:prefix_cache_queries)", registry=r)
        self.prefix_hits = Counter("serving_prefix_cache_hits", "Tokens found in the prefix cache at admission "
                                   "(vllm:prefix_cache_hits)", registry=r)
        self.preemptions = Counter("serving_num_preemptions", "Sequences preempted for want of KV blocks, and "
                                   "recomputed later (vllm:num_preemptions)", registry=r)
        # The same per replica (vLLM labels its counters per engine: engine="0", ...), and the prompt tokens each
        # replica actually computed: what routing requests to the replica holding their prefix saves (chapter 9)
        self.replica_queries = Counter("serving_replica_prefix_cache_queries", "Tokens looked up in the prefix "
                                       "cache at admission, per replica", ["replica"], registry=r)
        self.replica_hits = Counter("serving_replica_prefix_cache_hits", "Tokens found in the prefix cache at "
                                    "admission, per replica", ["replica"], registry=r)
        self.prefill_tokens = Counter("serving_prefill_tokens_computed", "Prompt tokens computed in the replica's "
                                      "steps (chunks and recomputation; not those found in the prefix cache), per "
                                      "replica (vllm:prompt_tokens_by_source{source=\"local_compute\"})",
                                      ["replica"], registry=r)

        # A speculating replica's counters (--speculative-config; helpers/course/speculative.py SpecStats), under
        # vLLM's names and meaning (vllm/v1/spec_decode/metrics.py SpecDecodingProm: vllm:spec_decode_num_drafts,
        # _num_draft_tokens, _num_accepted_tokens, _num_accepted_tokens_per_pos{position}), per replica as vLLM's
        # are per engine. A draft is one request's verification that had draft tokens; each emits its accepted
        # tokens and one of the target's own.
        self.spec_drafts = Counter("serving_spec_decode_num_drafts", "Verifications of a request's draft tokens "
                                   "(vllm:spec_decode_num_drafts)", ["replica"], registry=r)
        self.spec_draft_tokens = Counter("serving_spec_decode_num_draft_tokens", "Draft tokens proposed and "
                                         "verified (vllm:spec_decode_num_draft_tokens)", ["replica"], registry=r)
        self.spec_accepted = Counter("serving_spec_decode_num_accepted_tokens", "Draft tokens accepted "
                                     "(vllm:spec_decode_num_accepted_tokens)", ["replica"], registry=r)
        self.spec_accepted_per_pos = Counter("serving_spec_decode_num_accepted_tokens_per_pos", "Draft tokens "
                                             "accepted at each draft position, 0 first "
                                             "(vllm:spec_decode_num_accepted_tokens_per_pos)",
                                             ["replica", "position"], registry=r)

    def observe_spec(self, replica: int, stats: dict, before: dict) -> None:
        """Record a speculating replica's counters (replica.py spec_stats: totals since it started)."""
        def grow(counter, now, previous):
            counter.inc(now - (previous if now >= previous else 0))

        for key, counter in (("spec_num_drafts", self.spec_drafts), ("spec_num_draft_tokens", self.spec_draft_tokens),
                             ("spec_num_accepted_tokens", self.spec_accepted)):
            if key in stats:
                grow(counter.labels(replica=replica), stats[key], before.get(key, 0))
        positions, previous = stats.get("spec_accepted_per_pos", []), before.get("spec_accepted_per_pos", [])
        for pos, now in enumerate(positions):
            grow(self.spec_accepted_per_pos.labels(replica=replica, position=pos), now,
                 previous[pos] if pos < len(previous) else 0)

    def observe_kv(self, replica: int, stats: dict, before: dict) -> None:
        """Record a replica's KV report (and a speculating replica's counters: observe_spec). Its counters are
        totals since it started: add what grew since its last report (from 0 again after a restart)."""
        self.observe_spec(replica, stats, before)
        if "kv_blocks" not in stats:
            return   # a contiguous cache reports none
        self.kv_usage.labels(replica=replica).set(stats["kv_blocks_used"] / max(1, stats["kv_blocks"]))
        for key, counter in (("prefix_queries", self.prefix_queries), ("prefix_hits", self.prefix_hits),
                             ("preemptions", self.preemptions),
                             ("prefix_queries", self.replica_queries.labels(replica=replica)),
                             ("prefix_hits", self.replica_hits.labels(replica=replica)),
                             ("prefill_tokens", self.prefill_tokens.labels(replica=replica))):
            if key not in stats:
                continue
            previous = before.get(key, 0)
            counter.inc(stats[key] - (previous if stats[key] >= previous else 0))

    def watch_router(self, balancer) -> None:
        """Export chapter 9's router's figures (balancer.router_state()) at every scrape."""
        self.registry.register(RouterCollector(balancer))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RouterCollector:
    """The router's state as Prometheus series, read when /metrics is scraped (a custom collector: the Router keeps
    plain counts, routing/router.py). Dynamo's KV router reports its hits the like: a KvHitRateEvent per routing,
    aggregated by its metrics component into Prometheus series (ai-dynamo/dynamo components/metrics/README.md)."""

    def __init__(self, balancer):
        self.balancer = balancer

    def describe(self):
        return []

    def collect(self):
        state = self.balancer.router_state()
        if state is None:
            return
        routed = CounterMetricFamily("serving_router_routed", "Requests the router sent to each replica "
                                     f"(--routing {state['routing']})", labels=["replica"])
        index = GaugeMetricFamily("serving_router_index_blocks", "Blocks the router's KV index holds for each "
                                  "replica (from its KV events; 0 after the replica died)", labels=["replica"])
        stale = GaugeMetricFamily("serving_router_stale_replica", "1 while a replica with requests outstanding "
                                  "has published no KV event for --kv-events-stale-after seconds: routed on load "
                                  "alone", labels=["replica"])
        missed = CounterMetricFamily("serving_router_event_batches_missed", "KV event batches lost on the way "
                                     "(gaps in a replica's sequence numbers)", labels=["replica"])
        for i in range(len(self.balancer.replicas)):
            routed.add_metric([str(i)], state["routed"].get(i, 0))
            index.add_metric([str(i)], state["index_blocks"].get(i, 0))
            stale.add_metric([str(i)], 1 if i in state["stale_now"] else 0)
            missed.add_metric([str(i)], state["batches_missed"].get(i, 0))
        yield from (routed, index, stale, missed)
        yield CounterMetricFamily("serving_router_events_applied", "KV events applied to the router's index",
                                  value=state["events_applied"])
        yield CounterMetricFamily("serving_router_events_rejected", "KV events the router could not apply "
                                  "(malformed, unknown type): logged and skipped", value=state["events_rejected"])
        yield CounterMetricFamily("serving_router_event_batches_malformed", "KV event batches that could not be "
                                  "decoded: logged and skipped", value=state["batches_malformed"])
        yield CounterMetricFamily("serving_router_stale_routings", "Requests routed while some replica's index "
                                  "entries were taken for stale", value=state["stale_routings"])


def parse(text: str) -> dict:
    """Prometheus text -> {(sample name, frozenset(labels)): value}. `value(d, name, **labels)` reads one."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, default: float = 0.0, **labels) -> float:
    return samples.get((name, frozenset((k, str(v)) for k, v in labels.items())), default)


def histogram_quantile(samples: dict, name: str, q: float) -> float:
    """The q-quantile from a histogram's cumulative buckets, interpolated as PromQL's histogram_quantile."""
    buckets = sorted((float(dict(labels)["le"]), v) for (n, labels), v in samples.items() if n == name + "_bucket")
    if not buckets or buckets[-1][1] == 0:
        return float("nan")
    rank, prev_le, prev_count = q * buckets[-1][1], 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_count) / max(count - prev_count, 1e-12)
        prev_le, prev_count = le, count
    return prev_le
