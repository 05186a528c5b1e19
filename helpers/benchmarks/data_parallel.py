"""Chapters 4–5 figures: dynamic vs static load balancing on a skewed workload; the 8-process hybrid run.

    python -m helpers.bench data_parallel
"""
import time

from helpers import launch, load_impl
from helpers.course.workloads import serve, skewed_costs


def _balance_job(rank, world_size, costs, unit, dynamic):
    import torch.distributed as dist
    lb = load_impl("load_balance")
    run = lambda task: serve(costs[task], unit)  # noqa: E731
    dist.barrier()
    start = time.perf_counter()
    done = lb.dynamic_work_queue(len(costs), run, key="bench") if dynamic else \
        lb.round_robin(rank, world_size, len(costs), run)
    return [t for t, _ in done], time.perf_counter() - start


def _hybrid_job(rank, world_size, prompt, new_tokens):
    from helpers.course.tiny_llama import load_model
    hybrid = load_impl("hybrid")
    stage, grid = hybrid.build_hybrid_stage(load_model(), 2, 2, 2)
    return hybrid.hybrid_generate(stage, grid, prompt, new_tokens)


def run(world_size: int = 4, num_tasks: int = 32, unit: float = 0.01, repeats: int = 3, new_tokens: int = 16):
    makespan_units = load_impl("load_balance").makespan_units   # hybrid also uses chapters 2, 3 and 5's exercises
    costs = skewed_costs(num_tasks, world_size)
    for name, dynamic in (("round-robin", False), ("dynamic queue", True)):
        seconds, units = [], []
        for _ in range(repeats):
            res = launch(_balance_job, world_size, costs, unit, dynamic, show_output=False)
            seconds.append(max(s for _, s in res))
            units.append(makespan_units([t for t, _ in res], costs))
        print(f"{name:<14} {world_size} ranks, {num_tasks} requests (every {world_size}th 10x heavier): "
              f"makespan {min(seconds) * 1e3:7.1f} ms (best of {repeats}), {min(units):g} cost units")
        if dynamic:
            dyn = min(seconds)
        else:
            static = min(seconds)
    print(f"dynamic queue finishes {static / dyn:.2f}x sooner than round-robin on this skewed load")

    from helpers.course.tiny_llama import PROMPT, encode, generate, load_model
    prompt = encode(PROMPT)
    expected = generate(load_model(), prompt, new_tokens)
    start = time.perf_counter()
    results = launch(_hybrid_job, 8, prompt, new_tokens, show_output=False)
    total = time.perf_counter() - start
    ok = all(r == expected for r in results)
    print(f"DP=2 x TP=2 x PP=2 tiny Llama, 8 processes on this machine: launch + build + {new_tokens} tokens "
          f"in {total:.2f} s (job wall time {results.seconds:.2f} s), same tokens as unsharded: {ok}")
