"""Prefill vs decode on this machine: a measured roofline, and the vLLM cross-check's stored figures.

    python -m helpers.bench roofline

1. The matmuls of one forward step of ROOFLINE_CONFIG (helpers/course/roofline.py: a 2-layer Llama of ~95 MB of
   float32 weights, more than this CPU's last-level cache) on one thread, for 1 .. 512 tokens per step. A step of
   n tokens is a decode step of a batch of n sequences, or the prefill of an n-token prompt (the matmuls are the
   same). Peak FLOP/s = the best step; bandwidth = STREAM triad on one thread (stream_bandwidth), measured apart
   from the steps, with the one-token step's own bytes/s beside it.
   Ridge = peak / bandwidth (FLOP per byte); the decode batch where a step's intensity reaches the ridge is where
   decode stops being memory-bound. TTFT of a 512-token prompt vs ITL of a batch-1 decode step.
2. helpers/course/data/vllm_check.json, written by `make vllm-check` (vLLM 0.32 CPU on the course's tiny
   Llama): same greedy ids at TP 1 and 2, decode tokens/s at batch 1 and 8 beside the course's paged engine,
   vLLM's prefix-cache hit rate. Not re-measured here (vLLM needs its own environment and 1-2 minutes to start).
"""
from __future__ import annotations

import json

from helpers.course.roofline import ROOFLINE_CONFIG, ceilings, decode_intensity_limit, measure_linear_steps, \
    memory_bound_batch, step_cost, stream_bandwidth
from helpers.vllm_check import RESULT_PATH

TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


def roofline() -> None:
    rows = measure_linear_steps(ROOFLINE_CONFIG, TOKENS, repeats=7)
    print(f"{'tokens/step':>11} {'ms':>8} {'FLOP/B':>7} {'GFLOP/s':>8} {'GB/s':>6}")
    for r in rows:
        print(f"{r['tokens']:>11} {r['seconds'] * 1e3:>8.2f} {r['intensity']:>7.1f} {r['flop_per_s'] / 1e9:>8.1f} "
              f"{r['bytes_per_s'] / 1e9:>6.1f}")
    stream = stream_bandwidth()
    roofs = ceilings(rows, bandwidth=stream["triad"])
    print(f"STREAM (one thread): copy {stream['copy'] / 1e9:.1f} GB/s, triad {stream['triad'] / 1e9:.1f} GB/s; the "
          f"one-token step streams its weights at {rows[0]['bytes_per_s'] / 1e9:.1f} GB/s")
    b_star = memory_bound_batch(ROOFLINE_CONFIG, roofs)
    print(f"peak {roofs.peak_flop_per_s / 1e9:.1f} GFLOP/s, bandwidth {roofs.bandwidth / 1e9:.1f} GB/s "
          f"(STREAM triad, one thread): ridge {roofs.ridge:.1f} FLOP/B")
    long = {c: memory_bound_batch(ROOFLINE_CONFIG, roofs, context=c) for c in (1024, 4096)}
    print(f"decode stops being memory-bound at batch {b_star} (context 0); "
          + ", ".join(f"at context {c}: {'batch ' + str(b) if b else 'never'}" for c, b in long.items())
          + f" (every sequence reads its own KV cache; the limit at 4096 is "
          f"{decode_intensity_limit(ROOFLINE_CONFIG, 4096):.1f} FLOP/B)")
    by = {r["tokens"]: r for r in rows}
    print(f"TTFT of a 512-token prompt {by[512]['seconds'] * 1e3:.1f} ms vs ITL at batch 1 "
          f"{by[1]['seconds'] * 1e3:.1f} ms; at batch {by[8]['tokens']} {by[8]['seconds'] * 1e3:.1f} ms "
          f"({8 * by[1]['seconds'] / by[8]['seconds']:.1f}x the tokens/s of batch 1)")
    full = step_cost(ROOFLINE_CONFIG, 1, batch=1, context=1024)
    print(f"decode step at context 1024 (attention counted): {full.intensity:.2f} FLOP/B; prefill of 512 tokens: "
          f"{step_cost(ROOFLINE_CONFIG, 512).intensity:.0f} FLOP/B")


def vllm_figures() -> None:
    if not RESULT_PATH.exists():
        print("no helpers/course/data/vllm_check.json: run `make vllm-check`")
        return
    d = json.loads(RESULT_PATH.read_text())
    for tp, same in d["tokens_equal"].items():
        print(f"vLLM TP={tp}: greedy ids {'equal' if same else 'DIFFER'} to the course's "
              f"({len(d['prompts'])} prompts x {d['max_new_tokens']} tokens)")
    for b in ("1", "8"):
        vllm = ", ".join(f"vLLM TP={tp} {w['decode_tokens_per_s'][b]:.0f}" for tp, w in d["vllm"].items())
        print(f"decode tok/s at batch {b}: course paged engine {d['course']['decode_tokens_per_s'][b]:.0f}, {vllm} "
              "(recorded by make vllm-check)")
    pc = d["vllm"]["1"]["prefix_cache"]
    print(f"vLLM prefix cache, {pc['requests']} prompts sharing {pc['shared_prefix_tokens']} tokens: hit rate "
          f"{pc['hits'] / pc['queries']:.0%} ({pc['hits']} of {pc['queries']} prompt tokens)")


def run() -> None:
    roofline()
    vllm_figures()


if __name__ == "__main__":
    run()
