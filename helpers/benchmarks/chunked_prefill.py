"""Chunked prefill: ITL p99 of running decodes while long prompts arrive, with and without chunking.

    python -m helpers.bench chunked_prefill

1. On modelled device time. Every engine here is the course's engine (helpers/course/engine: LLMEngine.modelled,
   whose scheduler calls exercise 7.4's `schedule_step` with vLLM V1's rules; helpers/course/engine_loop.py
   builds the runs): chapter 6's DeviceCost prices every step (a mixed step reads the weights once and pays for
   each decode and each prompt token). The same workload (`Workload`: 8 requests decoding 384 tokens from t=0;
   8 prompts of 2,048 tokens arriving as a Poisson process of 2/s from t=0.5 s) is served
   * unchunked: enable_chunked_prefill=False, a whole prompt in one step (budget 8,192 tokens), with the decodes;
   * chunked: vLLM V1's order (running requests in admission order, then waiting ones) under a budget of 128,
     256, 512 or 1,024 tokens; and at 256 with the decode-first order of Sarathi-Serve / vLLM V0
     (SchedulerConfig(policy="decode_first")), the contrast;
   * disaggregated (helpers/course/disaggregated.py, the same workload and prices): a prefill engine and a decode
     engine, KV over a 25 GB/s link overlapped with decoding.
   ITL: every gap between two tokens of the 8 running decodes; TTFT: of the long prompts. The goal of the
   chapter: chunked (256) and disaggregated ITL p99 each at most half of unchunked, and no step over its budget.
   The price of chunking: every chunk pays the step's fixed cost again, so a long prompt's TTFT grows as the
   budget shrinks.

2. Measured (wall clock, this machine) on the same engine with the tiny Llama for real (LLMEngine.paged: a step's
   prompt chunks and decodes in ONE forward, as vLLM's model runner does): 4 requests decode while 4 prompts of
   224 tokens join one every 12 steps, whole (enable_chunked_prefill=False) or under a budget of 32 tokens. The
   gaps between the decoding requests' tokens are stamped by the engine's WallClock. A busy machine moves the
   digits; the unchunked spikes (a whole prefill inside one step) stay. Then decode tokens/s at batch 1 and 8,
   measured as `make vllm-check` measures them (helpers/vllm_check.py: batch × (n - 1) / (t(n) - t(1)), medians;
   the same LLMEngine.paged), beside vLLM CPU's figures stored by the last `make vllm-check`
   (helpers/course/data/vllm_check.json; the issue's target: batch 8 at least 0.8× vLLM's). The load average is
   printed with them: on a busy 2-core machine torch's threads wait for each other and the figures collapse.
"""
from __future__ import annotations

BUDGETS = (128, 256, 512, 1024)
GOAL_BUDGET = 256
MEASURED_BUDGET = 32


def figures(workload=None) -> dict:
    """{key: EngineResult} for the unchunked engine, each chunk budget, decode-first at the goal budget and the
    disaggregated pair."""
    from helpers.course.disaggregated import Link, run_disaggregated_model
    from helpers.course.engine_loop import UNCHUNKED, Workload, chunked_config, run_workload
    workload = workload or Workload()
    results = {"unchunked": run_workload(workload, UNCHUNKED, label="unchunked (budget 8192)")}
    for budget in BUDGETS:
        results[f"chunked {budget}"] = run_workload(workload, chunked_config(budget),
                                                    label=f"chunked (budget {budget})")
    results["decode first"] = run_workload(workload, chunked_config(GOAL_BUDGET, "decode_first"),
                                           label=f"decode first, V0 ({GOAL_BUDGET})")
    results["disaggregated"] = run_disaggregated_model(workload, Link(), label="disaggregated (1P + 1D)")
    return results


def run():
    from helpers.claims import verdict
    from helpers.course.engine_loop import PERCENTILE_METHOD, Workload, percentile
    from helpers.impl import impl_package
    workload = Workload()
    print(f"1. ITL of {workload.decoders} running decodes while {workload.long_prompts} prompts of "
          f"{workload.long_prompt} tokens arrive at {workload.long_rate:g}/s (modelled device time, DeviceCost(); "
          f"engine: helpers/course/engine LLMEngine.modelled, schedule_step of {impl_package()}/; "
          f"percentiles: {PERCENTILE_METHOD})")
    results = figures(workload)
    print(f"   {'engine':<26} {'ITL p50':>9} {'ITL p99':>9} {'ITL max':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'max tokens/step':>15} {'tokens/s':>9}")
    p99 = {}
    for key, res in results.items():
        itl, ttft = res.itls(workload.decoder_ids), res.ttfts(workload.long_ids)
        p99[key] = percentile(itl, 99)
        summary = res.summary()
        print(f"   {res.label:<26} {percentile(itl, 50) * 1e3:>6.1f} ms {p99[key] * 1e3:>6.1f} ms "
              f"{max(itl) * 1e3:>6.1f} ms {percentile(ttft, 50) * 1e3:>6.0f} ms {percentile(ttft, 99) * 1e3:>6.0f} ms "
              f"{max(s.tokens for s in res.steps):>15} {summary['tok_per_s']:>9.0f}")
    chunked = f"chunked {GOAL_BUDGET}"
    verdict(p99[chunked] <= p99["unchunked"] / 2,
            f"ITL p99 chunked (budget {GOAL_BUDGET}) {p99[chunked] * 1e3:.1f} ms ≤ half of unchunked "
            f"{p99['unchunked'] * 1e3:.1f} ms (ratio {p99['unchunked'] / p99[chunked]:.1f}×)")
    verdict(all(s.tokens <= budget for budget in BUDGETS for s in results[f"chunked {budget}"].steps),
            f"no step over its budget ({', '.join(map(str, BUDGETS))})")
    verdict(p99["disaggregated"] <= p99["unchunked"] / 2,
            f"ITL p99 disaggregated {p99['disaggregated'] * 1e3:.1f} ms ≤ half of unchunked "
            f"{p99['unchunked'] * 1e3:.1f} ms (ratio {p99['unchunked'] / p99['disaggregated']:.1f}×)")
    measured_on_the_engine()
    decode_throughput()


def _measured_itls(config, decoders=4, decoder_tokens=100, long_prompts=4, every=12, long_len=224, model=None):
    """The decoding requests' ITL gaps (seconds, wall clock) and the max tokens of a step, on LLMEngine.paged: the
    long prompts are added to the engine at steps 8, 8 + every, ... (the way a server adds what arrived)."""
    from helpers.course import tiny_llama
    from helpers.course.engine import LLMEngine, Request
    model = model or tiny_llama.load_model().eval()
    engine = LLMEngine.paged(model, num_blocks=128, block_size=16, config=config)
    text = tiny_llama.encode(tiny_llama.PROMPT)
    decoding = [Request(rid, text[rid:rid + 16], decoder_tokens) for rid in range(decoders)]
    for request in decoding:
        engine.add_request(request)
    submitted = 0
    while engine.has_unfinished or submitted < long_prompts:
        due = engine.num_steps >= 8 + submitted * every or not engine.has_unfinished
        if submitted < long_prompts and due:
            engine.add_request(Request(100 + submitted, (text * 8)[submitted:submitted + long_len], 4))
            submitted += 1
        engine.step()
        if engine.take_failed():
            raise RuntimeError("a request failed in the measured run")
    return [gap for r in decoding for gap in r.itls()], max(s.tokens for s in engine.steps)


def _machine() -> str:
    """CPUs, torch threads and the load average: wall-clock figures on a busy machine say little."""
    import os

    import torch
    return (f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, load average "
            f"{os.getloadavg()[0]:.1f}")


def measured_on_the_engine():
    from helpers.claims import verdict
    from helpers.course import tiny_llama
    from helpers.course.engine import SchedulerConfig, percentile
    print(f"\n2. Measured (wall clock, this machine: {_machine()}) on helpers/course/engine LLMEngine.paged, the tiny "
          f"Llama, one forward per step: 4 requests decode while 4 prompts of 224 tokens join")
    model = tiny_llama.load_model().eval()
    p99 = {}
    chunked = f"chunked (budget {MEASURED_BUDGET})"
    configs = {"unchunked": SchedulerConfig(max_num_batched_tokens=2048, enable_chunked_prefill=False),
               chunked: SchedulerConfig(max_num_batched_tokens=MEASURED_BUDGET)}
    for label, config in configs.items():
        itl, widest = _measured_itls(config, model=model)
        p99[label] = percentile(itl, 99)
        print(f"   {label:<26} ITL p50 {percentile(itl, 50) * 1e3:6.1f} ms   p99 {p99[label] * 1e3:6.1f} ms   "
              f"max {max(itl) * 1e3:6.1f} ms   ({len(itl)} gaps; largest step {widest} tokens)")
    verdict(p99[chunked] < p99["unchunked"],
            f"measured ITL p99 chunked {p99[chunked] * 1e3:.1f} ms < unchunked {p99['unchunked'] * 1e3:.1f} ms "
            f"on the real engine")


def decode_throughput():
    """Decode tokens/s of LLMEngine.paged at batch 1 and 8, as helpers/vllm_check.py measures both engines."""
    import json

    from helpers.course import tiny_llama
    from helpers.vllm_check import BATCHES, RESULT_PATH, course_engine, decode_rate
    model = tiny_llama.load_model().eval()
    name, generate = course_engine(model)
    stored = json.loads(RESULT_PATH.read_text()) if RESULT_PATH.exists() else {}
    vllm = stored.get("vllm", {}).get("1", {}).get("decode_tokens_per_s", {})
    print(f"\n   decode tokens/s ({name}; {_machine()}; helpers/vllm_check.py's measurement), beside vLLM CPU TP=1 "
          f"as stored by the last make vllm-check (its machine's figures):")
    for batch in BATCHES:
        rate = decode_rate(generate, batch)
        theirs = vllm.get(str(batch))
        beside = f"vLLM {theirs:7.0f} tok/s  course/vLLM {rate / theirs:.2f}" if theirs else "vLLM: not stored"
        print(f"   batch {batch}: course {rate:7.0f} tok/s   {beside}")


if __name__ == "__main__":
    run()
