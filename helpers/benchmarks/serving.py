"""Chapter 6 figures: batching policies on a virtual clock (TTFT, ITL, latency; deterministic), dynamic
(continuous) vs static batching on live servers with modelled device time at the same p99 latency bound, and
requests lost when a replica is killed under load (goal: 0) with the time the replica takes to come back."""
import threading
import time

from helpers.course import tiny_llama
from helpers.course.serving import start_server
from helpers.course.serving.device_time import ScheduleOnlyLM
from helpers.course.serving.loadtest import load_test, poisson_arrivals, replay

PROMPT = "Four score and seven years ago"
LENGTHS = [2, 24, 4, 16, 8]
MODEL = "helpers.course.serving.device_time"   # the tiny Llama whose forwards also sleep their modelled device time


def replayed(rates=(3, 12, 24), n_requests=300):
    """Each batching policy on the virtual clock (helpers.course.serving.loadtest.replay)."""
    ids = tiny_llama.encode(PROMPT)
    for rate in rates:
        arrivals = poisson_arrivals(rate, n_requests)
        for batching in ("none", "static", "continuous"):
            s = replay(ScheduleOnlyLM(), batching, arrivals, LENGTHS, ids).summary()
            print(f"virtual clock, {batching:>10} @ {rate:2d} req/s: p50 {s['p50']*1e3:6.0f} ms, p99 "
                  f"{s['p99']*1e3:6.0f} ms, TTFT p99 {s['ttft_p99']*1e3:6.0f} ms, ITL p99 {s['itl_p99']*1e3:5.1f} ms, "
                  f"{s['tok_per_s']:5.0f} tok/s")


def sustained_throughput(server, p99_bound: float, rates=(5, 10, 20, 40), n_requests=120):
    """Highest tok/s among the offered rates whose p99 latency stays under `p99_bound` seconds."""
    best = (0.0, None)
    for rate in rates:
        s = load_test(server.url, n_requests=n_requests, rate=rate, max_tokens=LENGTHS, prompts=(PROMPT,),
                      max_seconds=60).summary()
        if s["lost"] == 0 and s["p99"] <= p99_bound and s["tok_per_s"] > best[0]:
            best = (s["tok_per_s"], rate)
        if s["p99"] > 2 * p99_bound:
            break  # past saturation: higher rates only queue more
    return best


def run(p99_bound: float = 1.0):
    replayed()
    for batching in ("static", "continuous"):
        with start_server(replicas=1, batching=batching, max_batch=8, model=MODEL) as server:
            tok_s, rate = sustained_throughput(server, p99_bound)
        print(f"live, {batching:>10} batching: {tok_s:7.1f} tok/s sustained with p99 <= {p99_bound:g} s "
              f"(at {rate} req/s offered; modelled device time)")
    with start_server(replicas=2, max_batch=8) as server:
        killed = {}
        timer = threading.Timer(1.0, lambda: killed.update(pid=server.kill_replica(0), at=time.time()))
        timer.start()
        result = load_test(server.url, n_requests=120, rate=40, max_tokens=16, prompts=(PROMPT,), max_seconds=40)
        timer.join()
        server.wait_ready(timeout=60)
        back = server.replicas()[0]["ready_at"] - killed["at"]
        s = result.summary()
    retried = sum(1 for r in result.ok if r["retries"] > 0)
    print(f"replica killed under load: {s['sent']} sent, {s['lost']} lost, {retried} retried on the other "
          f"replica; killed replica serving again after {back:.2f} s; p99 {s['p99']:.3f} s")
