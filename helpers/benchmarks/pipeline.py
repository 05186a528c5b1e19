"""Chapter 3 figures: GPipe's measured bubble vs (p-1)/(m+p-1), and pipelined decoding's tokens/s.

Stage work: each of the 4 stages is a Linear(64, 64) + Tanh on a [32, 64] micro-batch followed by
`DeviceTime(40 ms)`: a fixed 40 ms of wall time per micro-batch ("device time"), either sleeping (the
host waits for its device) or busy-waiting (spin). 4 ranks on 2 shared cores cannot run 4 real
computations at once, so the stage time is held fixed instead; what the pipeline adds on top (sends,
receives, waking up a waiting rank) is real.
"""
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from helpers import launch, load_impl
from helpers.course.pipeline_runtime import DeviceTime
from helpers.timeline import Timeline, busy_fraction

P, STAGE_MS, HIDDEN, REPEATS = 4, 40.0, 64, 3


def _gpipe_job(rank, world_size, m, ms, spin, repeats):
    pp = load_impl("pipeline_parallel")
    torch.manual_seed(rank)
    stage = pp.PipelineStage.from_ranks(nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), DeviceTime(ms, spin=spin)),
                                        list(range(world_size)))
    batch = torch.randn(32, HIDDEN) if rank == 0 else None
    runs = []
    with torch.no_grad():
        for r in range(repeats + 1):            # run 0 warms the connections up
            dist.barrier()
            tl = Timeline(rank)
            pp.gpipe_forward(stage, batch, m, timeline=tl)
            if r:
                runs.append(tl.events)
    return runs


def measure_bubble(m, ms=STAGE_MS, spin=False, repeats=REPEATS, p=P):
    """Median over `repeats` runs of 1 - (time inside stage.forward spans) / (p x makespan)."""
    res = launch(_gpipe_job, p, m, ms, spin, repeats, show_output=False, threads=1)
    return statistics.median(1 - busy_fraction([e for runs in res for e in runs[r]], p) for r in range(repeats))


def _decode_job(rank, world_size, groups, n, stage_ms):
    from helpers.course.llama_stages import LlamaStage
    from helpers.course.tiny_llama import load_model
    dec = load_impl("pipelined_decoding")
    stage = LlamaStage(load_model(), rank, world_size)
    if stage_ms:
        inner, hold = stage.forward, DeviceTime(stage_ms)
        stage.forward = lambda *a, **k: hold(inner(*a, **k))
    dec.pipelined_generate(stage, list(range(world_size)), groups[:1], 2)   # warm-up
    dist.barrier()
    start = time.perf_counter()
    dec.pipelined_generate(stage, list(range(world_size)), groups, n)
    return time.perf_counter() - start


def decode_tokens_per_s(num_groups, stage_ms=0.0, n=16, per_group=2, p=P):
    from helpers.course.tiny_llama import encode
    texts = ["Four score and seven years ago", "We hold these truths to be self-evident",
             "A Fox one day fell into a deep well", "The Tortoise and the Hare"]
    groups = [torch.tensor([encode(texts[(g * per_group + j) % len(texts)][:12]) for j in range(per_group)])
              for g in range(num_groups)]
    seconds = launch(_decode_job, p, groups, n, stage_ms, show_output=False, threads=1)[0]
    return num_groups * per_group * n / seconds


def run():
    torch.set_num_threads(1)
    print(f"GPipe bubble, p={P}, stage work = Linear(64,64)+Tanh on [32,64] + {STAGE_MS:g} ms device time per "
          f"micro-batch, median of {REPEATS} runs:")
    print("   m   (p-1)/(m+p-1)   measured (sleep)   rel. err   measured (spin)   rel. err")
    for m in (1, 4, 16):
        theory = (P - 1) / (m + P - 1)
        slept, spun = measure_bubble(m, spin=False), measure_bubble(m, spin=True)
        print(f"  {m:2d}        {theory:.3f}            {slept:.3f}        {abs(slept - theory) / theory:6.1%}"
              f"          {spun:.3f}        {abs(spun - theory) / theory:6.1%}")
    print(f"\nPipelined greedy decoding, tiny Llama over {P} stages, 2 requests per group, 16 new tokens:")
    for stage_ms, what in ((0.0, "model compute only"), (5.0, "+ 5 ms device time per stage step")):
        one, four = decode_tokens_per_s(1, stage_ms), decode_tokens_per_s(4, stage_ms)
        print(f"  {what:36s}: 1 group {one:7.1f} tok/s, 4 groups {four:7.1f} tok/s ({four / one:.2f}x)")


if __name__ == "__main__":
    run()
