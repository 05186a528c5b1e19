"""Chapter 6 figures: dynamic (continuous) vs static batching at the same p99 latency bound, and requests
lost when a replica is killed under load (goal: 0) with the time the replica takes to come back."""
import threading
import time

from helpers.serving import start_server
from helpers.serving.loadtest import load_test

PROMPT = "Four score and seven years ago"
LENGTHS = [4, 32, 8, 24, 16]


def sustained_throughput(server, p99_bound: float, rates=(5, 10, 20, 40, 80, 160), n_requests=40):
    """Highest tok/s among the offered rates whose p99 latency stays under `p99_bound` seconds."""
    best = (0.0, None)
    for rate in rates:
        s = load_test(server.url, n_requests=n_requests, rate=rate, max_tokens=LENGTHS, prompts=(PROMPT,),
                      max_seconds=30).summary()
        if s["lost"] == 0 and s["p99"] <= p99_bound and s["tok_per_s"] > best[0]:
            best = (s["tok_per_s"], rate)
        if s["p99"] > 2 * p99_bound:
            break  # past saturation: higher rates only queue more
    return best


def run(p99_bound: float = 2.0):
    for batching in ("static", "continuous"):
        with start_server(replicas=1, batching=batching, max_batch=8) as server:
            tok_s, rate = sustained_throughput(server, p99_bound)
        print(f"{batching:>10} batching: {tok_s:7.1f} tok/s sustained with p99 <= {p99_bound:g} s "
              f"(at {rate} req/s offered)")
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
