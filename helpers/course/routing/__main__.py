"""`python -m helpers.course.routing [--seed N] [--quick]`: chapter 9's comparison, on modelled device time.

Three tables, each with the verdicts it supports (computed from the runs, never typed in):
  1. the chapter's workload (workload.py's defaults) on 8 replicas behind round robin, least outstanding, KV events
     with Dynamo's default weight 1 and with the chapter's weight 4, and SGLang's predicted caches (no events).
     Goals against round robin: hit rate >= 3x, prefill tokens computed >= 2.5x fewer, max/mean load <= 1.3.
  2. a skewed workload (tenant 0 sends half the sessions): pure cache affinity (a huge weight: load only breaks
     ties) piles the hot tenant on one replica; the load term spreads it.
  3. faults on the chapter's workload: replica 0 restarts mid-run (its cache is gone: AllBlocksCleared), events
     lost or late; "missed" counts the blocks the router counted on that were not there.
Run with COURSE_IMPL=solutions for the reference answers (the learner's labs/ otherwise).
"""
from __future__ import annotations

import argparse
import time

from helpers.course.routing.policies import ApproxTree, KVAware, LeastOutstanding, RoundRobin
from helpers.course.routing.replay import replay
from helpers.course.routing.transport import EventChannel
from helpers.course.routing.workload import chat_workload

CHAPTER_WEIGHT = 4.0          # the chapter's overlap_score_weight (Dynamo's default is 1: see the first table)
AFFINITY_ONLY = 1000.0        # a weight so large that only the cache counts
GOALS = {"hit_rate": 3.0, "prefill": 2.5, "load": 1.3}
SKEW = 0.5
RESTART_AT = 5.0              # modelled seconds into the run


def goals(result, baseline) -> dict:
    """The issue's three goals for `result` against round robin's `baseline`: {name: (value, met)}."""
    hit = result.hit_rate / baseline.hit_rate if baseline.hit_rate else float("inf")
    fewer = baseline.prefill_tokens / result.prefill_tokens if result.prefill_tokens else float("inf")
    return {"hit rate vs round robin": (hit, hit >= GOALS["hit_rate"]),
            "prefill tokens, times fewer": (fewer, fewer >= GOALS["prefill"]),
            "max/mean load": (result.load_imbalance, result.load_imbalance <= GOALS["load"])}


def table(results) -> str:
    head = (f"{'policy':30s} {'hit rate':>8s} {'prefill tok':>11s} {'TTFT p50':>9s} {'TTFT p99':>9s} "
            f"{'load max/mean':>13s} {'missed':>7s}  requests per replica")
    rows = [head, "-" * len(head)]
    for r in results:
        s = r.summary()
        rows.append(f"{r.policy:30s} {s['hit_rate']:8.1%} {s['prefill_tokens']:11,d} {s['ttft_p50'] * 1e3:7.1f}ms "
                    f"{s['ttft_p99'] * 1e3:7.1f}ms {s['max_mean_load']:13.2f} {s['missed_promises']:7d}  "
                    f"{list(s['per_replica_requests'].values())}")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="only the goals: round robin and KV events")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    ok = True

    workload = chat_workload(seed=args.seed)
    print(workload.describe())
    policies = [RoundRobin(), KVAware(CHAPTER_WEIGHT)] if args.quick else \
        [RoundRobin(), LeastOutstanding(), KVAware(1.0), KVAware(CHAPTER_WEIGHT), ApproxTree()]
    results = [replay(workload, p) for p in policies]
    print(table(results))
    baseline, chosen = results[0], next(r for r, p in zip(results, policies)
                                        if getattr(p, "overlap_score_weight", None) == CHAPTER_WEIGHT)
    for name, (value, met) in goals(chosen, baseline).items():
        ok &= met
        print(f"  goal, {chosen.policy}: {name} = {value:.2f} ({'met' if met else 'NOT met'})")
    if args.quick:
        print(f"({time.perf_counter() - started:.0f} s)")
        return 0 if ok else 1

    skewed = chat_workload(seed=args.seed, hot_tenant_share=SKEW)
    print("\n" + skewed.describe())
    affinity = replay(skewed, KVAware(AFFINITY_ONLY, name="cache affinity only"))
    balanced = replay(skewed, KVAware(CHAPTER_WEIGHT))
    print(table([affinity, balanced]))
    overloads = affinity.load_imbalance > GOALS["load"] >= balanced.load_imbalance
    ok &= overloads
    print(f"  cache affinity alone overloads a replica (load {affinity.load_imbalance:.2f} > {GOALS['load']}) and the "
          f"load term spreads it ({balanced.load_imbalance:.2f}): {'yes' if overloads else 'NO'}; TTFT p99 "
          f"{affinity.summary()['ttft_p99'] * 1e3:.0f} ms -> {balanced.summary()['ttft_p99'] * 1e3:.0f} ms")

    print(f"\nfaults ({workload.label}): replica 0 restarts at t = {RESTART_AT:g} s; events lost or late")
    faults = [replay(workload, KVAware(CHAPTER_WEIGHT, name="KV events, restart"), restart=(0, RESTART_AT)),
              replay(workload, ApproxTree(), restart=(0, RESTART_AT)),
              replay(workload, KVAware(CHAPTER_WEIGHT, name="KV events, 30% batches lost"),
                     channel=EventChannel(loss=0.3, seed=args.seed)),
              replay(workload, KVAware(CHAPTER_WEIGHT, name="KV events, 0.5 s late"), channel=EventChannel(delay=0.5))]
    faults[1].policy = "predicted, restart"
    print(table([chosen] + faults))
    print(f"  retried after the restart: {faults[0].retried} (KV events), {faults[1].retried} (predicted)")
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
