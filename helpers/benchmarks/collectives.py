"""Collective bandwidth on this machine, measured the way nccl-tests measures it.

    python -m helpers.bench collectives

For each op and message size S every rank runs a few warm-up calls, then `repeats` calls back to back; the
time of one call is the slowest rank's average (a collective is done when the last rank is done). Then
    algbw = S / time                       (S: the all-reduce's tensor; all-gather's output; reduce-scatter's input)
    busbw = algbw * 2(n-1)/n   all_reduce      busbw = algbw * (n-1)/n   all_gather, reduce_scatter
busbw is what one link of a ring carries per second, so it can be compared across n and across ops, and
with the hardware's bandwidth: here, the bandwidth of a single-process memory copy, the ceiling for
processes that exchange bytes through the kernel on one machine.

Figures printed: the full gloo sweep at 2 and 4 ranks, the ring all-reduce of exercise 1.1 (the reference
answer unless `--impl labs`, see helpers/bench.py) against dist.all_reduce at 64 MB on 4 ranks (goal >= 70 %),
and gloo's busbw at 64 MB as a fraction of the memcpy ceiling. The machine has 2 cores shared with other work, so
4 ranks contend for them and repeated runs differ by 10-30 %: quote the figures with that caveat.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from helpers import launch, load_impl, rank_device
from helpers.impl import impl_package

SIZES = [4 << 10, 64 << 10, 1 << 20, 8 << 20, 64 << 20]    # bytes: 4 KB ... 64 MB


def busbw_factor(op: str, n: int) -> float:
    """nccl-tests' bus-bandwidth factor: busbw = algbw * factor (see its doc/PERFORMANCE.md)."""
    if op.endswith("all_reduce"):
        return 2 * (n - 1) / n
    if op.endswith(("all_gather", "reduce_scatter")):
        return (n - 1) / n
    return 1.0


def _make_call(op: str, nbytes: int, n: int):
    """A zero-argument function running `op` once on fp32 buffers; nbytes is nccl-tests' size S."""
    device = rank_device()
    numel = max(n, nbytes // 4 // n * n)   # divisible by n so every rank's block has the same size
    if op == "all_reduce":
        x = torch.ones(numel, device=device)
        return lambda: dist.all_reduce(x)
    if op == "all_gather":
        out, x = torch.empty(numel, device=device), torch.ones(numel // n, device=device)
        return lambda: dist.all_gather_single(out, x)
    if op == "reduce_scatter":
        out, x = torch.empty(numel // n, device=device), torch.ones(numel, device=device)
        return lambda: dist.reduce_scatter_single(out, x)
    ring = load_impl("ring_collectives")
    if op == "ring_all_reduce":
        x = torch.ones(numel, device=device)
        return lambda: ring.ring_all_reduce(x)
    if op == "ring_all_gather":
        out, x = torch.empty(numel, device=device), torch.ones(numel // n, device=device)
        return lambda: ring.ring_all_gather(out, x)
    if op == "ring_reduce_scatter":
        out, x = torch.empty(numel // n, device=device), torch.ones(numel, device=device)
        return lambda: ring.ring_reduce_scatter(out, x)
    if op == "recursive_doubling_all_reduce":
        x = torch.ones(numel, device=device)
        return lambda: ring.recursive_doubling_all_reduce(x)
    raise ValueError(f"unknown op {op!r}")


def time_collective(rank: int, world_size: int, ops: list[str], sizes: list[int], repeats: int = 5,
                    warmup: int = 1, statistic: str = "mean") -> dict:
    """Worker: {(op, nbytes): seconds per call on this rank}. Ops: all_reduce, all_gather, reduce_scatter
    (gloo/NCCL's own) and ring_all_reduce, ring_all_gather, ring_reduce_scatter,
    recursive_doubling_all_reduce (the exercises of COURSE_IMPL, see helpers/bench.py).
    statistic: "mean" — `repeats` calls back to back, as nccl-tests times them; "min" — each call timed on
    its own after a barrier, the fastest kept: on a shared machine the calls that other work interrupted
    are the slow ones, so the minimum is the stable figure."""
    if statistic not in ("mean", "min"):
        raise ValueError(f"statistic={statistic!r}: use 'mean' or 'min'")
    sync = torch.cuda.synchronize if rank_device().type == "cuda" else (lambda: None)
    times = {}
    for nbytes in sizes:
        for op in ops:
            call = _make_call(op, nbytes, world_size)
            for _ in range(warmup):
                call()
            if statistic == "mean":
                dist.barrier()
                sync()
                start = time.perf_counter()
                for _ in range(repeats):
                    call()
                sync()
                times[(op, nbytes)] = (time.perf_counter() - start) / repeats
            else:
                best = float("inf")
                for _ in range(repeats):
                    dist.barrier()
                    sync()
                    start = time.perf_counter()
                    call()
                    sync()
                    best = min(best, time.perf_counter() - start)
                times[(op, nbytes)] = best
            del call
    return times


def sweep(world_size: int, ops: list[str], sizes: list[int] = SIZES, repeats: int = 5, **kwargs) -> list[dict]:
    """Run time_collective on `world_size` ranks; one row per (op, size) with seconds, algbw and busbw."""
    per_rank = launch(time_collective, world_size, ops, sizes, repeats, show_output=False, timeout=600, **kwargs)
    rows = []
    for (op, nbytes) in per_rank[0]:
        seconds = max(r[(op, nbytes)] for r in per_rank)   # done when the slowest rank is done
        algbw = nbytes / seconds
        rows.append({"op": op, "ranks": world_size, "bytes": nbytes, "seconds": seconds,
                     "algbw": algbw, "busbw": algbw * busbw_factor(op, world_size)})
    return rows


def memcpy_bandwidth(nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """Bytes per second one core copies from one buffer into another (torch's copy_, one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        src, dst = torch.ones(nbytes // 4), torch.empty(nbytes // 4)
        dst.copy_(src)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - start)
        return nbytes / best
    finally:
        torch.set_num_threads(threads)


def format_size(nbytes: int) -> str:
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


def format_rows(rows: list[dict]) -> str:
    # Measured figures are not padded: a notebook's output must read the same once timings are masked.
    width = max([16] + [len(r["op"]) for r in rows])
    lines = [f"{'op':<{width}} {'ranks':>5} {'size':>8}   time per call, algbw, busbw"]
    for r in rows:
        lines.append(f"{r['op']:<{width}} {r['ranks']:>5} {format_size(r['bytes']):>8}   {r['seconds'] * 1e3:.3f} ms, "
                     f"{r['algbw'] / 1e9:.3f} GB/s, {r['busbw'] / 1e9:.3f} GB/s")
    return "\n".join(lines)


def _interleaved(rank: int, world_size: int, ops: list[str], nbytes: int, rounds: int) -> dict:
    """Worker: time one call of each op, round after round, so that both see the same background load."""
    calls = {op: _make_call(op, nbytes, world_size) for op in ops}
    for call in calls.values():
        call()
    times = {op: [] for op in ops}
    for _ in range(rounds):
        for op, call in calls.items():
            dist.barrier()
            start = time.perf_counter()
            call()
            times[op].append(time.perf_counter() - start)
    return times


def ring_vs_gloo(world_size: int = 4, nbytes: int = 64 << 20, rounds: int = 7) -> list[float]:
    """Per-round busbw(ring solution) / busbw(dist.all_reduce) at the same size, ops interleaved in one job."""
    per_rank = launch(_interleaved, world_size, ["all_reduce", "ring_all_reduce"], nbytes, rounds,
                      show_output=False, timeout=600)
    slowest = {op: [max(r[op][i] for r in per_rank) for i in range(rounds)] for op in per_rank[0]}
    return [g / r for g, r in zip(slowest["all_reduce"], slowest["ring_all_reduce"])]


def run():
    ceiling = memcpy_bandwidth()
    print(f"memcpy ceiling (one process, one thread, 64 MB): {ceiling / 1e9:.2f} GB/s")
    for n in (2, 4):
        print(format_rows(sweep(n, ["all_reduce", "all_gather", "reduce_scatter"], SIZES, repeats=5)))
    small = sweep(4, ["all_reduce", "ring_all_reduce", "recursive_doubling_all_reduce"], [4 << 10], repeats=20)
    print(format_rows(small))
    rows = {r["op"]: r for r in sweep(4, ["all_reduce", "ring_all_reduce", "recursive_doubling_all_reduce",
                                          "all_gather", "ring_all_gather", "reduce_scatter", "ring_reduce_scatter"],
                                      [64 << 20], repeats=3)}
    print(format_rows(list(rows.values())))
    ratios = ring_vs_gloo()
    print(f"ring all-reduce ({impl_package()}) / gloo all_reduce busbw, 64 MB, 4 ranks: "
          f"median {statistics.median(ratios):.0%} (runs: {', '.join(f'{r:.0%}' for r in ratios)}; goal >= 70%)")
    gloo = rows["all_reduce"]["busbw"]
    print(f"gloo all_reduce busbw at 64 MB on 4 ranks: {gloo / 1e9:.2f} GB/s = {gloo / ceiling:.0%} "
          "of the memcpy ceiling")
