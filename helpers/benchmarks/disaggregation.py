"""Prefill/decode disaggregation: KV bytes per prompt token on real ranks, and ITL colocated vs disaggregated.

    python -m helpers.bench disaggregation

1. KV transfer on real ranks (helpers/course/disaggregated.py: run_disaggregated; exercise 7.5's send_kv /
   recv_kv of the implementation helpers/bench.py chose): rank 0, the course's engine (LLMEngine.paged: the
   tiny Llama on its own paged cache), prefills prompts of several lengths and its connector sends each one's
   blocks and first token to one of 2 decode ranks, each LLMEngine.paged on its own pool, which admit them
   and continue decoding. Per prompt: the
   bytes rank 0's CommTracer counted, the formula (16 B header + 4 layers × 2 × whole blocks × 16 tokens × 4 KV
   heads × 32 × 4 B: 4,096 B per token, rounded up to blocks of 16) and bytes per prompt token. The tokens are
   compared with helpers.course.tiny_llama.generate.
2. ITL under a prefill-heavy load, on modelled device time (helpers/course/engine_loop.py's Workload: 8 running
   decodes, 2,048-token prompts arriving at 2/s; chapter 6's DeviceCost prices; every device an
   LLMEngine.modelled whose scheduler is exercise 7.4's schedule_step): colocated unchunked on one device,
   chunked (budget 256) on one device, colocated unchunked on two replicas, and disaggregated (one prefill + one
   decode device, a 25 GB/s link). ITL of the running decodes (p50, p99), TTFT, devices.
3. When it pays: short (64) vs long (2,048) prompts, a fast (25 GB/s) vs a slow (10 MB/s) link, the decode
   device waiting for each transfer (blocking recv_kv, as on the real ranks above); the break-even bandwidth.
"""
from __future__ import annotations


PROMPT_LENGTHS = (16, 17, 64, 100, 200)
NEW_TOKENS = 8


def _prompts():
    from helpers.course.tiny_llama import CORPUS_PATH, encode
    text = CORPUS_PATH.read_text(encoding="utf-8")
    return [encode(text)[:n] for n in PROMPT_LENGTHS]


def kv_transfer() -> list[dict]:
    """Real ranks: bytes per prompt (tracer vs formula) and whether the tokens equal the colocated model's."""
    from helpers.course.disaggregated import run_disaggregated, transfer_bytes
    from helpers.course.tiny_llama import CONFIG, generate, load_model
    prompts = _prompts()
    run = run_disaggregated(prompts, NEW_TOKENS, decode_ranks=2, show_output=False, timeout=180)
    model = load_model()
    rows = []
    for prompt, transfer, tokens in zip(prompts, run.transfers, run.tokens):
        n = len(prompt)
        formula = transfer_bytes(n, CONFIG.num_hidden_layers, CONFIG.num_key_value_heads, CONFIG.head_dim)
        rows.append({**transfer, "formula": formula, "same_tokens": tokens == generate(model, prompt, NEW_TOKENS)})
    return rows


def run():
    from helpers.course.disaggregated import Link, break_even_bandwidth, compare_disaggregation, tradeoff
    from helpers.course.engine_loop import PERCENTILE_METHOD, Workload, percentile
    from helpers.impl import impl_package

    print(f"1. KV of a finished prefill sent to a decode rank (real ranks: 1 prefill + 2 decode, gloo on loopback; "
          f"each rank helpers/course/engine LLMEngine.paged; send_kv / recv_kv of {impl_package()}/)")
    print(f"   {'prompt tokens':>13} {'blocks':>6} {'-> rank':>7} {'bytes sent':>11} {'formula':>11} "
          f"{'B / prompt token':>16}  same tokens")
    rows = kv_transfer()
    for r in rows:
        print(f"   {r['tokens']:>13} {r['blocks']:>6} {r['decode_rank']:>7} {r['bytes']:>11,d} {r['formula']:>11,d} "
              f"{r['bytes'] / r['tokens']:>16,.0f}  {'yes' if r['same_tokens'] else 'NO'}")
    exact = all(r["bytes"] == r["formula"] for r in rows)
    print(f"   bytes = formula for every prompt: {'yes' if exact else 'NO'}; 4,096 B per token of K and V "
          f"(2 × 4 layers × 4 KV heads × 32 × 4 B), rounded up to whole blocks of 16 tokens, + a 16 B header")

    workload = Workload()
    print(f"\n2. ITL under a prefill-heavy load (modelled device time; every device helpers/course/engine "
          f"LLMEngine.modelled, schedule_step of {impl_package()}/; percentiles: {PERCENTILE_METHOD}): "
          f"{workload.decoders} running decodes, {workload.long_prompts} prompts of {workload.long_prompt} tokens "
          f"arriving at {workload.long_rate:g}/s")
    results = compare_disaggregation(workload, Link())
    devices = {"colocated": 1, "chunked": 1, "colocated ×2": 2, "disaggregated": 2}
    print(f"   {'way':<24} {'devices':>7} {'ITL p50':>9} {'ITL p99':>9} {'TTFT p50':>9} {'TTFT p99':>9}")
    for key, res in results.items():
        itl = res.itls(workload.decoder_ids)
        ttft = res.ttfts()
        print(f"   {res.label:<24} {devices[key]:>7} {percentile(itl, 50) * 1e3:>6.1f} ms "
              f"{percentile(itl, 99) * 1e3:>6.1f} ms {percentile(ttft, 50) * 1e3:>6.0f} ms "
              f"{percentile(ttft, 99) * 1e3:>6.0f} ms")
    disagg = results["disaggregated"]
    p99 = {key: percentile(res.itls(workload.decoder_ids), 99) for key, res in results.items()}
    print(f"   disaggregated: prefill device busy {disagg.busy['prefill']:.0%}, decode device busy "
          f"{disagg.busy['decode']:.0%}; ITL p99 disaggregated / colocated = "
          f"{p99['disaggregated'] / p99['colocated']:.2f}")

    print("\n3. When it pays (the decode device waits for each transfer, as a blocking recv_kv does)")
    print(f"   {'prompt':>6} {'link':<10} {'transfer':>10} {'per token':>10} {'ITL p99 colocated':>18} "
          f"{'ITL p99 disaggregated':>22} {'prefill device busy':>20}")
    for r in tradeoff():
        print(f"   {r['prompt_len']:>6} {r['link']:<10} {r['transfer_ms']:>7.2f} ms "
              f"{r['transfer_ms_per_token']:>7.4f} ms {r['colocated_itl_p99'] * 1e3:>15.1f} ms "
              f"{r['disaggregated_itl_p99'] * 1e3:>19.1f} ms {r['prefill_busy']:>20.0%}")
    print(f"   break-even bandwidth: {break_even_bandwidth() / 1e6:.0f} MB/s (4,096 B per prompt token moved in the "
          f"0.1 ms it takes to compute);\n   below it a blocking transfer stalls the decodes longer than the prefill "
          f"did")
