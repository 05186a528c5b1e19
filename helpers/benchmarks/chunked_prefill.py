"""Chunked prefill: ITL p99 of running decodes while long prompts arrive, with and without chunking.

    python -m helpers.bench chunked_prefill

On modelled device time (helpers/course/engine_loop.py: chapter 6's DeviceCost prices every step; a mixed
step reads the weights once and pays for each decode and each prompt token), the same workload (`Workload`:
8 requests decoding 384 tokens from t=0; 8 prompts of 2,048 tokens arriving as a Poisson process of 2/s from
t=0.5 s) is served by one engine whose scheduler is exercise 7.4's `schedule_step` (load_impl):
  * unchunked: a whole prompt in one step (budget 8,192 tokens, at least the longest prompt), with the decodes;
  * chunked: decodes first, prompt chunks fill what is left of a budget of 128, 256, 512 or 1,024 tokens;
  * disaggregated (helpers/course/disaggregated.py, the same workload and prices): prompts on a prefill
    device, decodes on a decode device, KV over a 25 GB/s link overlapped with decoding.
ITL: every gap between two tokens of the 8 running decodes; TTFT: of the long prompts. The goal of the
chapter: chunked (256) and disaggregated ITL p99 each at most half of unchunked. The price of chunking:
every chunk pays the step's fixed cost again, so a long prompt's TTFT grows as the budget shrinks.

Then the same comparison measured (wall clock, this machine) on chapter 6's server engine with the paged cache
(helpers/course/serving/paged_engine.py, the tiny Llama for real): 4 sequences decode while 4 prompts of
224 tokens join one every 12 steps, whole (token_budget=None) or in chunks of 32 (7.4's schedule_step). The
gaps between the decoding sequences' tokens are measured where each token is appended. A busy machine moves
the digits; the unchunked spikes (a whole prefill inside one step) stay. This engine runs a step's prompt
chunks and its decodes as separate forwards (vLLM fuses them into one batch), so chunking costs some p50 here.
"""
from __future__ import annotations

BUDGETS = (128, 256, 512, 1024)
GOAL_BUDGET = 256


def figures(workload=None) -> dict:
    """{label: LoopResult} for the unchunked engine, each chunk budget and the disaggregated pair."""
    from helpers.course.disaggregated import Link, run_disaggregated_model
    from helpers.course.engine_loop import Workload, run_workload
    workload = workload or Workload()
    results = {"unchunked": run_workload(workload, 8192, False, label="unchunked (budget 8192)")}
    for budget in BUDGETS:
        results[f"chunked {budget}"] = run_workload(workload, budget, True, label=f"chunked (budget {budget})")
    results["disaggregated"] = run_disaggregated_model(workload, Link(), label="disaggregated (1P + 1D)")
    return results


def run():
    from helpers.claims import verdict
    from helpers.impl import impl_package
    from helpers.course.engine_loop import Workload, percentile
    workload = Workload()
    long_ids = {r.rid for r in workload.requests()} - workload.decoder_ids
    print(f"ITL of {workload.decoders} running decodes while {workload.long_prompts} prompts of "
          f"{workload.long_prompt} tokens arrive at {workload.long_rate:g}/s (modelled device time, DeviceCost(); "
          f"schedule_step of {impl_package()}/)")
    results = figures(workload)
    print(f"   {'engine':<26} {'ITL p50':>9} {'ITL p99':>9} {'ITL max':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'max tokens/step':>15} {'tokens/s':>9}")
    p99 = {}
    for key, res in results.items():
        itl, ttft = res.itls(workload.decoder_ids), res.ttfts(long_ids)
        p99[key] = percentile(itl, 99)
        summary = res.summary()
        print(f"   {res.label:<26} {percentile(itl, 50) * 1e3:>6.1f} ms {p99[key] * 1e3:>6.1f} ms "
              f"{max(itl) * 1e3:>6.1f} ms {percentile(ttft, 50) * 1e3:>6.0f} ms {percentile(ttft, 99) * 1e3:>6.0f} ms "
              f"{max(s.tokens for s in res.steps):>15} {summary['tok_per_s']:>9.0f}")
    chunked = f"chunked {GOAL_BUDGET}"
    verdict(p99[chunked] <= p99["unchunked"] / 2,
            f"ITL p99 chunked (budget {GOAL_BUDGET}) {p99[chunked] * 1e3:.1f} ms ≤ half of unchunked "
            f"{p99['unchunked'] * 1e3:.1f} ms (ratio {p99['unchunked'] / p99[chunked]:.1f}×)")
    verdict(p99["disaggregated"] <= p99["unchunked"] / 2,
            f"ITL p99 disaggregated {p99['disaggregated'] * 1e3:.1f} ms ≤ half of unchunked "
            f"{p99['unchunked'] * 1e3:.1f} ms (ratio {p99['unchunked'] / p99['disaggregated']:.1f}×)")
    measured_on_the_server_engine()


def _itls_on_the_server_engine(token_budget, decoders=4, long_prompts=4, every=12, long_len=224):
    """ITL gaps (seconds) of the decoding sequences, and the max tokens computed in a step, on PagedEngine."""
    import time

    from helpers.course import tiny_llama
    from helpers.course.serving.engine import Sequence
    from helpers.course.serving.paged_engine import PagedEngine
    model = tiny_llama.load_model().eval()
    engine = PagedEngine(model, max_batch=decoders + long_prompts, num_blocks=128, token_budget=token_budget)
    text = tiny_llama.encode(tiny_llama.PROMPT)
    times = {}
    append = engine._append

    def timed_append(seq, logits):
        append(seq, logits)
        times.setdefault(seq.rid, []).append(time.perf_counter())

    engine._append = timed_append
    for rid in range(decoders):
        engine.submit(Sequence(rid, text[rid:rid + 16], 256 - 16))
    step = submitted = 0
    while engine.has_work:
        if submitted < long_prompts and step >= 8 + submitted * every:
            engine.submit(Sequence(100 + submitted, (text * 8)[submitted:submitted + long_len], 4))
            submitted += 1
        engine.step()
        step += 1
        if step > 8 + long_prompts * every + 40:
            break   # the window with the long prompts is what is measured
    return [b - a for rid in range(decoders) for a, b in zip(times[rid], times[rid][1:])]


def measured_on_the_server_engine():
    from helpers.claims import verdict
    from helpers.course.engine_loop import percentile
    print("Measured on chapter 6's server engine (PagedEngine, the tiny Llama, wall clock on this machine): "
          "4 sequences decode while 4 prompts of 224 tokens join")
    p99 = {}
    for label, budget in (("unchunked", None), ("chunked (budget 32)", 32)):
        itl = _itls_on_the_server_engine(budget)
        p99[label] = percentile(itl, 99)
        print(f"   {label:<26} ITL p50 {percentile(itl, 50) * 1e3:6.1f} ms   p99 {p99[label] * 1e3:6.1f} ms   "
              f"max {max(itl) * 1e3:6.1f} ms   ({len(itl)} gaps)")
    verdict(p99["chunked (budget 32)"] < p99["unchunked"],
            f"measured ITL p99 chunked {p99['chunked (budget 32)'] * 1e3:.1f} ms < unchunked "
            f"{p99['unchunked'] * 1e3:.1f} ms on the real engine")


if __name__ == "__main__":
    run()
