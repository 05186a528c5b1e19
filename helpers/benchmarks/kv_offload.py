"""A KV offload tier behind the engine's connector (chapter 9): prompt tokens recomputed, bytes moved, TTFT.

    python -m helpers.bench kv_offload

1. The chapter's chat (helpers/course/kv_offload.py chapter_workload: 4 tenants, 8 sessions of 3 turns) on the
   tiny Llama's paged engine with prefix caching and a device pool of 16 blocks of 16 tokens, too small for the
   working set, on modelled device time (DeviceCost), twice: without a tier, and with the host tier in another
   process (rank 1 of a gloo job; exercise 9.3's OffloadingConnector of the implementation helpers/bench.py
   chose; loads priced over a PCIe 4.0 x16 link). Prompt tokens computed / found in the device cache / loaded;
   what a pool large enough for the whole working set would compute (a modelled schedule, LLMEngine.modelled);
   KV bytes sent and received, on both sides of the wire, against blocks × the formula; TTFT p50 / p99; whether
   every request's tokens and top-3 logprobs are the same.
2. Recompute vs load: a 4,096-token prefix of Llama-3-8B and Llama-3-70B, prefill at 50 % of an H100's dense
   bf16 peak against its KV over PCIe 4 / 5 and 100 / 400 Gb/s networks (nominal bandwidths).
"""
from __future__ import annotations


def run():
    from helpers.course.engine import percentile
    from helpers.course.kv_offload import chapter_workload, offload_run, recompute_vs_load, whole_working_set
    from helpers.impl import impl_package

    workload = chapter_workload()
    print(f"1. {workload.describe()}; tiny Llama, device pool 16 blocks of 16, modelled device time; "
          f"OffloadingConnector of {impl_package()}/")
    without, with_tier = offload_run(workload)
    floor = whole_working_set(workload)
    print(f"   {'run':<22} {'prompt':>7} {'computed':>8} {'device hits':>11} {'loaded':>7} {'TTFT p50':>9} "
          f"{'TTFT p99':>9}")
    for r in (without, with_tier):
        print(f"   {r.label:<22} {r.prompt_tokens:>7} {r.computed:>8} {r.local_hits:>11} {r.loaded:>7} "
              f"{1e3 * percentile(r.ttfts, 50):>7.1f}ms {1e3 * percentile(r.ttfts, 99):>7.1f}ms")
    print(f"   a device pool holding the whole working set computes {floor} prompt tokens: the tier recomputes "
          f"{with_tier.computed - floor}, the device pool alone {without.computed - floor}")
    tier, side = with_tier.tier, with_tier.tier_side
    print(f"   KV bytes: sent {tier['kv_bytes_sent']:,} (tier received {side['kv_bytes_received']:,}) = "
          f"{tier['blocks_stored']} blocks × {with_tier.block_bytes:,}; loaded {tier['kv_bytes_received']:,} "
          f"(tier sent {side['kv_bytes_sent']:,}) = {tier['blocks_loaded']} blocks × {with_tier.block_bytes:,}; "
          f"control {tier['control_bytes']:,} B")
    same = all(without.requests[rid][0] == with_tier.requests[rid][0] for rid in without.requests)
    print(f"   same tokens for all {len(without.requests)} requests: {same}")
    print("2. recompute vs load a 4,096-token prefix (prefill at 50 % of 989 TFLOP/s; nominal link bandwidths)")
    for model in ("Llama-3-8B", "Llama-3-70B"):
        for row in recompute_vs_load(model):
            print(f"   {model:<12} {row['link']:<17} KV {row['kv_bytes'] / 1e6:7.1f} MB  "
                  f"load {1e3 * row['load_s']:6.2f} ms  recompute {1e3 * row['recompute_s']:7.2f} ms  "
                  f"({row['ratio']:5.1f}× the load)")
