"""The paged KV cache and prefix caching on this machine: bytes held, sequences that fit, TTFT.

    python -m helpers.bench paged_kv

1. KV bytes, padded vs paged. A seeded mixed-length workload (REQUESTS requests; prompt and output lengths
   skewed: most short, a few long, each at most the tiny Llama's 256 positions) at full length, K and V of
   all layers in float32 (4,096 B per token, KVPool.bytes_per_token). Three caches:
   * padded to max_model_len: every sequence reserves all 256 positions up front (a static cache, as
     transformers' StaticCache or pre-vLLM servers do);
   * padded to the longest: one [batch, longest] tensor for the whole batch;
   * paged (exercise 7.1's BlockManager, blocks of 16): each sequence holds
     ceil(length / 16) blocks, taken as it grows (allocate for the prompt, append_slot per new token).
   Then a fixed budget of BUDGET_BLOCKS blocks (4 MiB): how many of the workload's sequences fit at once,
   counted both ways, and measured on the course's engine (helpers/course/engine: LLMEngine.paged, the tiny
   Llama on a pool of that size: the largest decode batch it reached, its preemptions, and the tokens equal to
   transformers').
2. TTFT with and without prefix caching at a 90 % shared prefix: SHARED_TOKENS of the corpus (a shared
   "system prompt", 14 blocks of 16) + UNIQUE_TOKENS per request, PREFIX_REQUESTS requests one after another,
   each served to its first token by LLMEngine.paged with prefix caching on or off.
   Printed per request after the first (which fills the cache): prefill tokens computed; TTFT modelled with
   chapter 6's DeviceCost (a fixed 8 ms per forward + 0.1 ms per prompt token: the tiny Llama as if on an
   accelerator; the fixed cost is why the ratio is below the token ratio); prefill FLOPs (2 × parameters ×
   tokens, embedding excluded); and the measured wall time of admitting the request (allocate + prefill) on
   this CPU (the request's steps), for the record. The first generated tokens are checked equal with and without
   the cache; the hit rate is vLLM's (tokens found / tokens looked up at admission, the engine's KV manager).
"""
from __future__ import annotations

import random
import statistics
import time

import torch

REQUESTS = 48
MAX_LEN = 256                   # the tiny Llama's max_position_embeddings
BLOCK_SIZE = 16
BUDGET_BLOCKS = 64              # 64 blocks × 16 tokens × 4,096 B = 4 MiB of KV
ENGINE_REQUESTS, ENGINE_NEW_TOKENS = 16, 16
SHARED_TOKENS, UNIQUE_TOKENS, PREFIX_REQUESTS = 224, 25, 6


def workload(seed: int = 0, n: int = REQUESTS) -> list[tuple[int, int]]:
    """(prompt tokens, output tokens) per request: log-normal lengths, most short, a few long; total ≤ 256."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = min(200, max(4, int(rng.lognormvariate(3.6, 0.7))))
        output = min(MAX_LEN - prompt, max(4, int(rng.lognormvariate(3.0, 0.6))))
        out.append((prompt, output))
    return out


def kv_bytes(requests, block_size: int = BLOCK_SIZE) -> dict:
    """Bytes of KV held with each cache, every sequence at full length. Paged: by a real BlockManager."""
    from helpers.course.kv_cache import KVPool
    from helpers.course.tiny_llama import CONFIG
    from helpers import load_impl
    BlockManager = load_impl("paged_kv_cache").BlockManager
    per_token = KVPool.for_model(CONFIG, 1, block_size).bytes_per_token
    manager = BlockManager(sum(-(-(p + o) // block_size) for p, o in requests), block_size)
    for i, (prompt, output) in enumerate(requests):
        manager.allocate(i, prompt)
        for _ in range(output):
            manager.append_slot(i)
    used_blocks = manager.num_blocks - manager.num_free_blocks
    tokens = sum(p + o for p, o in requests)
    return {"tokens": tokens, "per_token": per_token, "exact": tokens * per_token,
            "padded_max": len(requests) * MAX_LEN * per_token,
            "padded_longest": len(requests) * max(p + o for p, o in requests) * per_token,
            "paged": used_blocks * block_size * per_token, "blocks": used_blocks}


def fit_in_budget(requests, budget_blocks: int = BUDGET_BLOCKS, block_size: int = BLOCK_SIZE) -> dict:
    """Sequences of the workload, in order, that fit in the budget at their full length at once."""
    budget_tokens = budget_blocks * block_size
    padded = budget_tokens // MAX_LEN
    paged, used = 0, 0
    for prompt, output in requests:
        need = -(-(prompt + output) // block_size)
        if used + need > budget_blocks:
            break
        used, paged = used + need, paged + 1
    return {"padded": padded, "paged": paged}


def _serve(engine, requests) -> tuple[int, float]:
    """Serve `requests` (all there at once) on `engine` step by step; returns the most blocks held after a step
    and the wall seconds. The engine's own loop is LLMEngine.step: this only watches the pool between steps."""
    for request in requests:
        engine.add_request(request)
    peak, start = 0, time.perf_counter()
    while engine.has_unfinished:
        engine.step()
        failed = engine.take_failed()
        if failed:
            raise RuntimeError(f"request {failed[0].rid!r} failed: {failed[0].error}")
        peak = max(peak, engine.kv.num_blocks - engine.kv.num_free_blocks)
    return peak, time.perf_counter() - start


def engine_batch(requests, budget_blocks: int = BUDGET_BLOCKS) -> dict:
    """Run the course's engine (helpers/course/engine: LLMEngine.paged, exercises 7.1-7.2 and 7.4 of the
    implementation helpers/bench.py chose) on the workload's first ENGINE_REQUESTS prompts (ENGINE_NEW_TOKENS
    new tokens each) on a pool of budget_blocks: the largest decode batch it reached, the most blocks held, its
    preemptions; tokens vs transformers'."""
    from helpers.course.engine import LLMEngine, Request
    from helpers.course.tiny_llama import CORPUS_PATH, encode, generate, load_model
    text = encode(CORPUS_PATH.read_text(encoding="utf-8"))
    rng = random.Random(1)
    prompts = []
    for prompt, _ in requests[:ENGINE_REQUESTS]:
        start = rng.randrange(len(text) - prompt)
        prompts.append(text[start:start + min(prompt, MAX_LEN - ENGINE_NEW_TOKENS)])
    model = load_model()
    engine = LLMEngine.paged(model, num_blocks=budget_blocks, block_size=BLOCK_SIZE)
    served = [Request(i, p, ENGINE_NEW_TOKENS, arrival=0.0) for i, p in enumerate(prompts)]
    peak_blocks, seconds = _serve(engine, served)
    want = [generate(model, p, ENGINE_NEW_TOKENS) for p in prompts]
    return {"peak_running": max(len(s.decodes) for s in engine.steps), "peak_blocks_used": peak_blocks,
            "preemptions": engine.scheduler.num_preemptions, "same_tokens": [r.tokens for r in served] == want,
            "seconds": seconds, "padded_batch": budget_blocks * BLOCK_SIZE // MAX_LEN}


def prefix_ttft(prefix_caching: bool) -> dict:
    """Serve PREFIX_REQUESTS requests sharing SHARED_TOKENS one after another on LLMEngine.paged (prefix caching
    on or off), each to its first token; per request after the first: prefill tokens computed, modelled TTFT,
    measured wall time of its step; every request's first token; the hit rate as vLLM counts it (the engine's
    KV cache manager: tokens found / tokens looked up at admission)."""
    from helpers.course.engine import LLMEngine, Request
    from helpers.course.serving.device_time import DeviceCost
    from helpers.course.tiny_llama import CORPUS_PATH, encode, load_model
    text = encode(CORPUS_PATH.read_text(encoding="utf-8"))
    shared = text[:SHARED_TOKENS]
    model = load_model()
    engine = LLMEngine.paged(model, num_blocks=64, block_size=BLOCK_SIZE, enable_prefix_caching=prefix_caching)
    cost = DeviceCost()
    computed, modelled, measured, first = [], [], [], []
    for r in range(PREFIX_REQUESTS):
        prompt = shared + text[1000 + 500 * r:1000 + 500 * r + UNIQUE_TOKENS]
        request = Request(r, prompt, 1, arrival=0.0)
        steps_before = len(engine.steps)
        _, seconds = _serve(engine, [request])
        tokens = sum(s.prefill_tokens for s in engine.steps[steps_before:])
        measured.append(seconds)
        first.append(request.tokens[0])
        computed.append(tokens)
        modelled.append(cost.seconds(1, tokens))
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    later = slice(1, None)
    return {"prompt": SHARED_TOKENS + UNIQUE_TOKENS, "computed": statistics.mean(computed[later]),
            "modelled": statistics.mean(modelled[later]), "measured": statistics.median(measured[later]),
            "flops": 2 * params * statistics.mean(computed[later]), "first": first,
            "hit_rate": engine.kv.stats.hit_rate}


def run():
    from helpers.impl import impl_package
    torch.set_num_threads(1)
    requests = workload()
    b = kv_bytes(requests)
    mib = 2 ** 20
    print(f"1. KV bytes of {REQUESTS} mixed-length sequences at full length (seeded; {b['tokens']:,} tokens, "
          f"{b['per_token']:,} B per token, blocks of {BLOCK_SIZE})")
    lengths = sorted(p + o for p, o in requests)
    print(f"   lengths: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]} tokens")
    print(f"{'cache':>24}  {'bytes':>10}  {'x exact':>7}")
    for label, key in (("padded to max_model_len", "padded_max"), ("padded to the longest", "padded_longest"),
                       ("paged", "paged"), ("exact (no waste)", "exact")):
        print(f"{label:>24}  {b[key] / mib:>6.1f} MiB  {b[key] / b['exact']:>7.2f}")
    print(f"   paged wastes {(b['paged'] - b['exact']) / b['paged']:.1%} (the unused tail of each last block); "
          f"padded to max_model_len holds {b['padded_max'] / b['paged']:.1f}x the paged bytes")
    fit = fit_in_budget(requests)
    print(f"\n   Sequences of this workload that fit in {BUDGET_BLOCKS} blocks = "
          f"{BUDGET_BLOCKS * BLOCK_SIZE * b['per_token'] / mib:.0f} MiB at once: padded to {MAX_LEN} tokens "
          f"{fit['padded']}, paged {fit['paged']} ({fit['paged'] / fit['padded']:.1f}x the batch)")
    e = engine_batch(requests)
    print(f"   The engine on that pool (helpers/course/engine LLMEngine.paged, exercises of {impl_package()}/; "
          f"{ENGINE_REQUESTS} prompts of the workload, {ENGINE_NEW_TOKENS} new tokens "
          f"each): largest decode batch {e['peak_running']} (padded: {e['padded_batch']}), peak "
          f"{e['peak_blocks_used']} blocks, {e['preemptions']} preemptions, same tokens as transformers: "
          f"{e['same_tokens']} ({e['seconds']:.1f} s)")
    print(f"\n2. TTFT at a {SHARED_TOKENS / (SHARED_TOKENS + UNIQUE_TOKENS):.0%} shared prefix on LLMEngine.paged "
          f"({SHARED_TOKENS} shared + {UNIQUE_TOKENS} unique tokens, {PREFIX_REQUESTS} requests one after "
          f"another; mean of requests 2..{PREFIX_REQUESTS}, measured: median)")
    off, on = prefix_ttft(False), prefix_ttft(True)
    print(f"{'prefix cache':>12}  {'prefill tokens':>14}  {'prefill FLOPs':>13}  {'TTFT modelled':>13}  "
          f"{'TTFT measured':>13}")
    for label, r in (("off", off), ("on", on)):
        print(f"{label:>12}  {r['computed']:>14.0f}  {r['flops']:>13.2e}  {r['modelled'] * 1e3:>10.1f} ms  "
              f"{r['measured'] * 1e3:>10.1f} ms")
    print(f"   ratio off/on: prefill tokens {off['computed'] / on['computed']:.1f}x, modelled TTFT "
          f"{off['modelled'] / on['modelled']:.1f}x (goal >= 3x), measured {off['measured'] / on['measured']:.1f}x; "
          f"hit rate {on['hit_rate']:.0%}; same first tokens: {off['first'] == on['first']}")


if __name__ == "__main__":
    run()
