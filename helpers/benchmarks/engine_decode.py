"""Decode speed of the course's engine on the tiny Llama: tokens/s at batch 1 and 8, and where a step's time goes.

    python -m helpers.bench engine_decode

The engine is the one `make vllm-check` times beside vLLM's CPU build (helpers/vllm_check.py `course_engine`:
LLMEngine.paged, the tiny Llama on a paged KV cache of 128 blocks of 16, one engine serving every call), timed
the same way (`decode_rate`): batch × (n - 1) / (t(n new tokens) - t(1 new token)), the median of REPEATS runs,
so the prefill and the first token are not counted; one torch thread, as vLLM's TP=1 model worker has one core.

Then one decode run at batch 8 is split by wall time into the model runner's forward
(PagedLlamaRunner.forward_batch), and within it the decode attention (exercise 7.2's `paged_attention`, called
once per layer), and the rest of the engine's step (scheduling, the KV cache manager, sampling): what a faster
forward can and cannot win.

vLLM's own figure is not measured here (it needs vLLM's environment and about 4 minutes: `make vllm-check`); the
figure that run stored in helpers/course/data/vllm_check.json is printed beside the course's, marked as stored,
with the machine load of that run unknown: compare on one machine, in one run, before quoting a ratio.
"""
from __future__ import annotations

import json
import time

import torch

BATCHES = (1, 8)
NEW_TOKENS = 64


def split_step_time(batch: int = 8, new_tokens: int = NEW_TOKENS) -> dict:
    """Seconds of one run of `batch` prompts × new_tokens spent in the whole engine, in the runner's forward and in
    the decode attention (paged_attention), measured by wrapping those two functions with perf_counter."""
    import types

    from helpers.course import tiny_llama
    from helpers.course.engine import LLMEngine, Request, run_requests
    from helpers.vllm_check import PROMPTS, encode

    engine = LLMEngine.paged(tiny_llama.load_model(), num_blocks=8 * 16, block_size=16)     # as course_engine
    prompts = [encode(p) for p in (PROMPTS * 8)[:batch]]
    run_requests(engine, [Request(("warm-up", i), p, 2, arrival=0.0) for i, p in enumerate(prompts)])
    paged, spent = engine.paged_model, {"forward": 0.0, "attention": 0.0}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
        return wrapper

    paged.forward_batch = timed("forward", paged.forward_batch)            # this instance only
    paged.paged = types.SimpleNamespace(paged_attention=timed("attention", paged.paged.paged_attention))
    start = time.perf_counter()
    run_requests(engine, [Request(i, p, new_tokens, arrival=0.0) for i, p in enumerate(prompts)])
    spent["total"] = time.perf_counter() - start
    return spent


def run():
    from helpers.course import tiny_llama
    from helpers.vllm_check import REPEATS, RESULT_PATH, course_engine, decode_rate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _, generate = course_engine(tiny_llama.load_model())
        rates = {b: decode_rate(generate, b) for b in BATCHES}
        split = split_step_time()
    finally:
        torch.set_num_threads(threads)
    stored = json.loads(RESULT_PATH.read_text()) if RESULT_PATH.exists() else {}
    vllm = stored.get("vllm", {}).get("1", {}).get("decode_tokens_per_s", {})
    print(f"course engine decode (LLMEngine.paged, 1 torch thread, median of {REPEATS} runs per point):")
    for b in BATCHES:
        line = f"  batch {b}: {rates[b]:,.0f} tok/s"
        if str(b) in vllm:
            line += (f"   (vLLM TP=1 {vllm[str(b)]:,.0f} tok/s stored by make vllm-check, not measured now: "
                     f"{rates[b] / vllm[str(b)]:.2f}x)")
        print(line)
    total, forward, attention = split["total"], split["forward"], split["attention"]
    print(f"one run at batch 8, {NEW_TOKENS} new tokens each: {total * 1e3:.0f} ms in the engine, of which\n"
          f"  the runner's forward {forward / total:.0%} (decode attention, exercise 7.2's paged_attention: "
          f"{attention / total:.0%})\n  the rest of the step (scheduling, KV cache manager, sampling) "
          f"{1 - forward / total:.0%}")
