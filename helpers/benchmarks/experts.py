"""Expert parallelism on this machine: bytes per token on the wire, and what a skewed router costs.

    python -m helpers.bench experts

1. Bytes per token. The MoE block of helpers/course/moe.py (hidden 256, 8 experts, top-2) run two ways on
   n = 2 and 4 ranks, traced with CommTracer:
   * EP (solutions/expert_parallel.py), attention data-parallel: each rank holds its own tokens and E/n
     experts; two all_to_alls (dispatch, combine) move each kept slot's row to its expert's rank and back.
   * TP (helpers.course.moe.TensorParallelMoE): every rank sees ALL tokens and holds 1/n of every expert;
     one all-reduce of [tokens, hidden] per layer.
   The figure is the bytes all ranks together put on the wire, divided by the tokens of the batch (each token
   is processed once by the system). "exact" counts only the rows that leave their rank (a slot whose expert
   is local costs nothing); the tracer's ring convention counts (n-1)/n of every all_to_all payload.
   Theory, uniform routing: EP 2·k·h·b·(n-1)/n, TP 2·h·b·(n-1): EP/TP = k/n.
2. Slowest rank. 4 ranks, 8 experts, top-2, 64 tokens per rank, every expert call taking a modelled device
   time of MS_PER_ROW per row (ExpertDeviceTime: a sleep, so it holds on a busy machine). The layer is done
   when its slowest rank is: random tokens vs a skewed batch (skew_towards: expert 0's logit +SKEW),
   dropless and with capacity factor 1.0 (slots beyond the capacity dropped: bounded time, lost work).
   "modelled" is rows × MS_PER_ROW of the slowest rank; "measured" the wall time of its expert calls.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from helpers import launch, load_impl

HIDDEN, FFN, EXPERTS, TOP_K = 256, 512, 8, 2
TOKENS_PER_RANK = 64
MS_PER_ROW = 1.0
SKEW = 2.0      # logit boost of expert 0 for every token (helpers.course.moe.skew_towards)


def _block():
    from helpers.course.moe import MoEBlock
    torch.manual_seed(0)
    return MoEBlock(HIDDEN, FFN, EXPERTS, TOP_K)


def _tokens(rank, tokens=TOKENS_PER_RANK, block=None, skew=0.0):
    from helpers.course.moe import skew_towards
    torch.manual_seed(100 + rank)
    x = torch.randn(tokens, HIDDEN)
    return skew_towards(x, block, 0, skew) if skew else x


def _bytes_job(rank, world_size):
    from helpers.comm_trace import CommTracer
    from helpers.course.moe import TensorParallelMoE, experts_of_rank
    ep_impl = load_impl("expert_parallel")
    ExpertParallelMoE, top_k_route = ep_impl.ExpertParallelMoE, ep_impl.top_k_route
    block = _block()
    x = _tokens(rank)
    with torch.no_grad():
        routing = top_k_route(block.router(x), TOP_K)
        ep = ExpertParallelMoE(block)
        with CommTracer() as ep_trace:
            ep(x, routing)
        # exact: rows whose expert lives on another rank, out and back
        owner = routing.expert_ids[routing.kept] // len(experts_of_rank(EXPERTS, 0, world_size))
        remote_rows = int((owner != rank).sum())
        exact = 2 * remote_rows * HIDDEN * x.element_size()
        # TP: every rank holds every token of the batch (all ranks' tokens, in rank order)
        everyone = torch.cat([_tokens(r) for r in range(world_size)])
        tp = TensorParallelMoE(block)
        with CommTracer() as tp_trace:
            tp(everyone, top_k_route(block.router(everyone), TOP_K))
    ep_wire = sum(r.wire for r in ep_trace.records if r.op.startswith("all_to_all"))
    counts_wire = sum(r.wire for r in ep_trace.records if r.payload <= EXPERTS * 8)
    tp_wire = sum(r.wire for r in tp_trace.records if r.op == "all_reduce")
    return ep_wire, counts_wire, exact, tp_wire


def bytes_per_token(world_size: int) -> dict:
    """Bytes on the wire per token of the batch, EP (tracer and exact) and TP, summed over the ranks."""
    rows = launch(_bytes_job, world_size, show_output=False, timeout=120)
    tokens = TOKENS_PER_RANK * world_size
    ep, counts, exact, tp = (sum(r[i] for r in rows) for i in range(4))
    n, row = world_size, HIDDEN * 4
    return {"ep": ep / tokens, "counts": counts / tokens, "ep_exact": exact / tokens, "tp": tp / tokens,
            "ep_theory": 2 * TOP_K * row * (n - 1) / n, "tp_theory": 2 * row * (n - 1)}


def _slowest_job(rank, world_size, skew, capacity_factor, repeats):
    from helpers.course.moe import ExpertDeviceTime
    ep_impl = load_impl("expert_parallel")
    ExpertParallelMoE, expert_capacity, top_k_route = \
        ep_impl.ExpertParallelMoE, ep_impl.expert_capacity, ep_impl.top_k_route
    block = _block()
    x = _tokens(rank, block=block, skew=skew)
    with torch.no_grad():
        logits = block.router(x)
        capacity = None if capacity_factor is None else \
            expert_capacity(x.shape[0], EXPERTS, TOP_K, capacity_factor)
        routing = top_k_route(logits, TOP_K, capacity)
        ep = ExpertParallelMoE(block)
        timer = ExpertDeviceTime(MS_PER_ROW)
        timer.wrap(ep.experts)
        layer = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            ep(x, routing)
            layer.append(time.perf_counter() - start)
    dropped = int((~routing.kept).sum())
    return timer.rows / repeats, timer.seconds / repeats, min(layer), dropped, routing.kept.numel()


def slowest_rank(skew: float, capacity_factor: float | None, world_size: int = 4, repeats: int = 3) -> dict:
    """Per-rank expert rows and modelled expert time; the layer's time (slowest rank); slots dropped."""
    rows = launch(_slowest_job, world_size, skew, capacity_factor, repeats, show_output=False, timeout=120)
    expert_rows = [r[0] for r in rows]
    expert_seconds = [r[1] for r in rows]
    return {"rows": expert_rows, "expert_seconds": expert_seconds, "layer_seconds": max(r[2] for r in rows),
            "dropped": sum(r[3] for r in rows) / sum(r[4] for r in rows),
            "imbalance": max(expert_rows) / (sum(expert_rows) / len(expert_rows))}


def run():
    print(f"1. Bytes on the wire per token (MoE hidden {HIDDEN}, {EXPERTS} experts, top-{TOP_K}, float32, "
          f"{TOKENS_PER_RANK} tokens per rank; all ranks together / tokens of the batch)")
    print(f"{'ranks':>5}  {'EP all_to_all':>13}  {'(counts)':>8}  {'EP exact':>9}  {'EP theory':>9}  "
          f"{'TP all-reduce':>13}  {'TP theory':>9}  {'EP / TP':>7}")
    for n in (2, 4):
        b = bytes_per_token(n)
        print(f"{n:>5}  {b['ep']:>11,.0f} B  {b['counts']:>6,.1f} B  {b['ep_exact']:>7,.0f} B  "
              f"{b['ep_theory']:>7,.0f} B  {b['tp']:>11,.0f} B  {b['tp_theory']:>7,.0f} B  {b['ep'] / b['tp']:>7.2f}")
    print(f"   EP / TP = top_k / n = {TOP_K}/n under uniform routing: EP moves less as the group grows; TP's "
          f"all-reduce also needs every rank to hold every token.")
    print(f"\n2. Slowest rank (4 ranks, {EXPERTS} experts, top-{TOP_K}, {TOKENS_PER_RANK} tokens per rank, "
          f"modelled {MS_PER_ROW} ms per expert row)")
    print(f"{'batch':>9}  {'capacity':>8}  {'rows per rank':>22}  {'max/mean':>8}  {'modelled':>9}  "
          f"{'measured':>9}  {'layer':>9}  {'dropped':>7}")
    for label, skew in (("random", 0.0), ("skewed", SKEW)):
        for factor in (None, 1.0):
            s = slowest_rank(skew, factor)
            rows = "/".join(f"{r:.0f}" for r in s["rows"])
            print(f"{label:>9}  {'none' if factor is None else factor:>8}  {rows:>22}  {s['imbalance']:>8.2f}  "
                  f"{max(s['rows']) * MS_PER_ROW:>6.1f} ms  {max(s['expert_seconds']) * 1e3:>6.1f} ms  "
                  f"{s['layer_seconds'] * 1e3:>6.1f} ms  "
                  f"{s['dropped']:>7.1%}")


if __name__ == "__main__":
    run()
