"""Context parallelism on this machine: per-rank attention memory and exactness of ring attention.

    python -m helpers.bench long_context

One causal prompt of SEQ tokens (HEADS heads of HEAD_DIM, float32) split over CP = 1, 2, 4 ranks in the zigzag
layout (helpers/course/ring_attention.py), attended with ring attention (solutions/context_parallel.py, the
reference of exercise 8.4). For each CP:
  * per-rank attention memory: the peak bytes of the tensors the attention call allocates on each rank
    (helpers.course.ring_attention.PeakMemory: scores, softmax terms, accumulators, the K/V block in flight),
    beside full attention in one process (attention_reference: the [heads, S, S] score matrix);
  * max |diff| of the gathered output against full attention, with the bound 64 eps × scale of float32;
  * the K/V bytes each rank sent around the ring (CommTracer) and its wall time (a busy machine's figure).
"""
from __future__ import annotations

import time

import torch

from helpers import launch, load_impl

SEQ, HEADS, HEAD_DIM = 2048, 4, 32
CPS = (1, 2, 4)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(HEADS, SEQ, HEAD_DIM, generator=g) for _ in range(3)]


def _job(rank, world_size):
    from helpers.comm_trace import CommTracer
    from helpers.course.ring_attention import PeakMemory, shard_sequence
    ring_attention = load_impl("context_parallel").ring_attention
    local = [shard_sequence(t, rank, world_size, "zigzag") for t in _inputs()]
    start = time.perf_counter()
    with CommTracer() as trace, PeakMemory() as mem:
        out = ring_attention(*local, causal=True, order="zigzag")
    seconds = time.perf_counter() - start
    sent = sum(r.payload for r in trace.records if r.op in ("send", "isend"))
    return out, mem.peak, sent, seconds


def run():
    from helpers.claims import max_abs_diff, tolerance
    from helpers.course.ring_attention import PeakMemory, attention_reference, unshard_sequence
    q, k, v = _inputs()
    with PeakMemory() as mem:
        full = attention_reference(q, k, v, causal=True)
    print(f"causal attention, {SEQ} tokens, {HEADS} heads × {HEAD_DIM}, float32, zigzag layout")
    print(f"full attention in one process: peak {mem.peak / 2**20:8.1f} MiB (the {HEADS}×{SEQ}×{SEQ} scores)")
    print(f"{'CP':>3} {'peak MiB/rank':>14} {'vs CP=1':>8} {'K/V sent/rank':>14} {'max |diff|':>11} "
          f"{'bound':>9} {'wall':>8}")
    base = None
    for cp in CPS:
        results = launch(_job, cp, show_output=False, timeout=600)
        out = unshard_sequence([r[0] for r in results], "zigzag")
        peak = max(r[1] for r in results)
        base = base or peak
        diff, bound = max_abs_diff(out, full), tolerance(full, torch.float32, 64)
        print(f"{cp:>3} {peak / 2**20:>14.2f} {peak / base:>8.3f} {max(r[2] for r in results) / 2**20:>11.2f} MiB "
              f"{diff:>11.1e} {bound:>9.1e} {max(r[3] for r in results):>6.2f} s")
    print("per-rank memory falls faster than 1/CP: the Q/K/V/output rows are 1/CP, the score blocks 1/CP².")


if __name__ == "__main__":
    run()
