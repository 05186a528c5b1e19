"""Wrong answers to chapter 8's part B exercises, and other correct ones, for tests/graders/test_ch08_long_context.py.

Each wrong variant is a realistic mistake; several give the RIGHT values the wrong way (an all-reduce where a
reduce-scatter belongs, masked-out work computed anyway, one block too many sent), so only a grader that checks
the collectives, the bytes and the work catches them. The ALTERNATIVES are correct answers written another
way (all_gather_into_tensor / reduce_scatter_tensor; separate isend/irecv of K and V around the ring the
other way; isend/irecv imported by name, each send waited for only at the end); they must pass.
`build(name)` returns an implementation object (`.context_parallel`, `.sequence_parallel`) that the graders'
check functions accept in place of load_impl("context_parallel") and load_impl("sequence_parallel").
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import irecv, isend          # (alt_by_name_late_send_wait calls them by these names)

from helpers.course.ring_attention import ORDERS, chunks_of_rank


@dataclass(frozen=True)
class Variant:
    exercise: str
    check: str          # a key of test_ch08_long_context.CHECKS, run in a 4-rank job
    what: str
    points_at: tuple    # the first failure message must contain one of these


VARIANTS = {
    "sp_gather_bwd_all_reduce": Variant("8.3", "sp", "gather's backward all-reduces, then keeps my rows",
                                        ("reduce-scatter",)),
    "sp_gather_bwd_no_sum": Variant("8.3", "sp", "gather's backward keeps my rows of my gradient", ("sum over ranks",)),
    "sp_rs_by_all_reduce": Variant("8.3", "sp", "reduce-scatter as all-reduce + my rows", ("reduce-scatter",)),
    "sp_scatter_bwd_local": Variant("8.3", "sp", "scatter's backward pads my gradient with zeros", ("all-gathered",)),
    "sp_wrong_dim": Variant("8.3", "sp", "gathers along the last dimension", ("sequence (dim 0)",)),
    "sp_floor_rows": Variant("8.3", "sp_errors", "uneven sequence split by floor division", ("ValueError",)),
    "ring_all_gather": Variant("8.4", "ring", "K/V all-gathered, no ring", ("point-to-point",)),
    "ring_no_rescale": Variant("8.4", "ring", "running sum and output not rescaled", ("rescale the running sum",)),
    "ring_no_max": Variant("8.4", "ring", "no running max subtracted", ("running max is subtracted",)),
    "ring_local_mask": Variant("8.4", "ring", "causal mask by local row index", ("GLOBAL position",)),
    "ring_no_skip": Variant("8.4", "ring", "masked-out chunk pairs computed anyway", ("skip every",)),
    "ring_forward_last": Variant("8.4", "ring", "the last block forwarded too", ("cp-1",)),
    "ring_send_after_compute": Variant("8.4", "ring", "block sent after computing with it", ("BEFORE computing",)),
    "ring_wait_before_compute": Variant("8.4", "ring", "each step's transfer posted, then waited for, then the "
                                        "compute: no overlap", ("no step computed",)),
    "ring_overlap_first_step_only": Variant("8.4", "ring", "only the first step computes while a transfer is in "
                                            "flight; later steps wait first", ("only some steps computed",)),
    "ring_blocking_send_recv": Variant("8.4", "ring", "blocking dist.send/dist.recv (even ranks send first)",
                                       ("dist.send/dist.recv block",)),
    "ring_ignores_order": Variant("8.4", "ring", "zigzag treated as contiguous", ("layout `order`",)),
    "ring_no_errors": Variant("8.4", "ring_errors", "unknown order accepted", ("ValueError",)),
}
ALTERNATIVES = ("alt_into_tensor", "alt_separate_kv_reverse_ring", "alt_by_name_late_send_wait")


def build(name: str | None):
    """The reference implementation, or a variant of it (a key of VARIANTS or ALTERNATIVES)."""
    import solutions.context_parallel as sol
    import solutions.sequence_parallel as sp_sol
    cp = types.SimpleNamespace(**{k: v for k, v in vars(sol).items() if not k.startswith("__")})
    sp = types.SimpleNamespace(**{k: v for k, v in vars(sp_sol).items() if not k.startswith("__")})
    if name is not None:
        if name not in VARIANTS and name not in ALTERNATIVES:
            raise KeyError(name)
        if name.startswith("sp_") or name == "alt_into_tensor":
            ops = _sequence_parallel_ops(name)
            sp.scatter_to_sequence_parallel_region = ops["scatter"]
            sp.gather_from_sequence_parallel_region = ops["gather"]
            sp.reduce_scatter_to_sequence_parallel_region = ops["reduce_scatter"]
        else:
            cp.ring_attention = lambda q, k, v, group=None, causal=True, order="zigzag": \
                _ring_attention(q, k, v, group, causal, order, name)
    return types.SimpleNamespace(context_parallel=cp, sequence_parallel=sp)


# ------------------------------------------------------------------------------------------- 8.3

def _sequence_parallel_ops(mistake):
    dim = -1 if mistake == "sp_wrong_dim" else 0

    def rows(x, n):
        if x.shape[0] % n and mistake != "sp_floor_rows":
            raise ValueError(f"sequence of {x.shape[0]} rows is not divisible by {n}")
        return x.shape[0] // n

    def my_rows(x, group):
        r, n = dist.get_rank(group), dist.get_world_size(group)
        m = rows(x, n)
        return x[r * m:(r + 1) * m].clone()

    def all_gather(x, group):
        n = dist.get_world_size(group)
        if n == 1:
            return x.clone()
        if mistake == "alt_into_tensor":
            out = torch.empty(n * x.shape[0], *x.shape[1:], dtype=x.dtype)
            dist.all_gather_into_tensor(out, x.contiguous(), group=group)
            return out
        parts = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    def reduce_scatter(x, group, by_all_reduce=False):
        n = dist.get_world_size(group)
        m = rows(x, n)
        if n == 1:
            return x.clone()
        if by_all_reduce:
            x = x.clone()
            dist.all_reduce(x, group=group)
            return my_rows(x, group)
        out = torch.empty_like(x[:m])
        if mistake == "alt_into_tensor":
            dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
        else:
            dist.reduce_scatter(out, list(x.contiguous().split(m)), group=group)
        return out

    class Scatter(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, group):
            ctx.group, ctx.shape = group, x.shape
            return my_rows(x, group)

        @staticmethod
        def backward(ctx, grad):
            if mistake == "sp_scatter_bwd_local":
                full = grad.new_zeros(ctx.shape)
                r = dist.get_rank(ctx.group)
                full[r * grad.shape[0]:(r + 1) * grad.shape[0]] = grad
                return full, None
            return all_gather(grad, ctx.group), None

    class Gather(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, group):
            ctx.group = group
            return all_gather(x, group)

        @staticmethod
        def backward(ctx, grad):
            if mistake == "sp_gather_bwd_no_sum":
                return my_rows(grad, ctx.group), None
            return reduce_scatter(grad, ctx.group, mistake == "sp_gather_bwd_all_reduce"), None

    class ReduceScatter(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, group):
            ctx.group = group
            return reduce_scatter(x, group, mistake == "sp_rs_by_all_reduce")

        @staticmethod
        def backward(ctx, grad):
            return all_gather(grad, ctx.group), None

    def scatter(x, group=None):
        rows(x, dist.get_world_size(group))
        return Scatter.apply(x, group)

    def reduce_scatter_to(x, group=None):
        rows(x, dist.get_world_size(group))
        return ReduceScatter.apply(x, group)

    return {"scatter": scatter, "gather": lambda x, group=None: Gather.apply(x, group),
            "reduce_scatter": reduce_scatter_to}


# ------------------------------------------------------------------------------------------- 8.4

def _ring_attention(q, k, v, group, causal, order, mistake):
    """The reference ring attention with one mistake (or alternative) planted."""
    if order not in ORDERS:
        if mistake != "ring_no_errors":
            raise ValueError(f"order={order!r}")
        order = "zigzag"
    if q.dim() != 3 or q.shape != k.shape or k.shape != v.shape or q.shape[1] % 2:
        raise ValueError("bad shapes")
    heads, local, head_dim = q.shape
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    chunk, scale = local // 2, 1 / math.sqrt(head_dim)
    layout = "contiguous" if mistake == "ring_ignores_order" else order
    my_chunks = chunks_of_rank(rank, cp, layout)
    m = torch.full((heads, local, 1), float("-inf"))
    l, o = torch.zeros(heads, local, 1), torch.zeros(heads, local, head_dim)
    diagonal_mask = torch.ones(chunk, chunk, dtype=torch.bool).triu(1)
    reverse = mistake == "alt_separate_kv_reverse_ring"
    step_dir = -1 if reverse else 1
    glob = (lambda g: dist.get_global_rank(group, g)) if group is not None else (lambda g: g)
    to_rank, from_rank = glob((rank + step_dir) % cp), glob((rank - step_dir) % cp)

    if mistake == "ring_all_gather":
        blocks = [torch.empty_like(torch.stack([k, v])) for _ in range(cp)]
        dist.all_gather(blocks, torch.stack([k, v]), group=group)
    kv, late_sends = torch.stack([k, v]), []
    for step in range(cp):
        owner = (rank - step_dir * step) % cp
        requests, incoming = [], None
        if mistake == "ring_all_gather":
            kv = blocks[owner]
        elif mistake == "ring_send_after_compute":
            pass
        elif mistake == "alt_by_name_late_send_wait" and step < cp - 1:
            incoming = torch.empty_like(kv)                 # the receive waited for after the compute, the send
            late_sends.append(isend(kv, to_rank, group=group))      # only at the very end: still in flight
            requests = [irecv(incoming, from_rank, group=group)]    # through the last step
        elif mistake == "ring_blocking_send_recv" and step < cp - 1:
            incoming = torch.empty_like(kv)
            pair = [lambda: dist.send(kv, to_rank, group=group), lambda: dist.recv(incoming, from_rank, group=group)]
            for op in pair if rank % 2 == 0 else pair[::-1]:      # even ranks send first: no deadlock
                op()
        elif step < cp - 1 or (mistake == "ring_forward_last" and cp > 1):
            incoming = torch.empty_like(kv)
            if reverse:
                requests = [dist.isend(kv[0].contiguous(), to_rank, group=group),
                            dist.isend(kv[1].contiguous(), to_rank, group=group)]
                halves = [torch.empty_like(kv[0]), torch.empty_like(kv[1])]
                requests += [dist.irecv(halves[0], from_rank, group=group),
                             dist.irecv(halves[1], from_rank, group=group)]
            else:
                requests = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv, to_rank, group),
                                                   dist.P2POp(dist.irecv, incoming, from_rank, group)])
            if mistake == "ring_wait_before_compute" or (mistake == "ring_overlap_first_step_only" and step > 0):
                for request in requests:            # the block arrives before this step's compute starts
                    request.wait()
                requests = []                       # (a gloo request waited for twice never returns)
        for qi, qc in enumerate(my_chunks):
            rows = slice(qi * chunk, (qi + 1) * chunk)
            for ki, kc in enumerate(chunks_of_rank(owner, cp, layout)):
                if causal and kc > qc and mistake not in ("ring_no_skip", "ring_local_mask"):
                    continue
                cols = slice(ki * chunk, (ki + 1) * chunk)
                s = (q[:, rows] @ kv[0, :, cols].transpose(-1, -2)) * scale
                if causal and mistake == "ring_local_mask":
                    s = s.masked_fill(diagonal_mask, float("-inf"))
                elif causal and kc == qc:
                    s = s.masked_fill(diagonal_mask, float("-inf"))
                elif causal and kc > qc:                   # ring_no_skip: computed, then masked entirely
                    s = torch.full_like(s, float("-inf"))
                if mistake == "ring_no_max":
                    m_new = torch.zeros_like(m[:, rows])
                else:
                    m_new = torch.maximum(m[:, rows], s.amax(dim=-1, keepdim=True))
                p = torch.exp(s - m_new)
                correction = torch.exp(m[:, rows] - m_new).nan_to_num(0.0)
                if mistake == "ring_no_rescale":
                    correction = torch.ones_like(correction)
                l[:, rows] = l[:, rows] * correction + p.sum(dim=-1, keepdim=True)
                o[:, rows] = o[:, rows] * correction + p @ kv[1, :, cols]
                m[:, rows] = m_new
        if mistake == "ring_send_after_compute" and step < cp - 1:
            incoming = torch.empty_like(kv)
            requests = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv, to_rank, group),
                                               dist.P2POp(dist.irecv, incoming, from_rank, group)])
        for request in requests:
            request.wait()
        if incoming is not None:
            if reverse:
                incoming = torch.stack(halves)
            kv = incoming
    for request in late_sends:
        request.wait()
    return o / l
