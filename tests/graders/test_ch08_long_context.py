"""Graders for chapter 8, part B (labs/sequence_parallel.py, labs/context_parallel.py): the sequence-parallel
region (8.3) and ring attention (8.4).

Each exercise has a check function `check_*(impl, rank, world_size, group, label) -> [failure, ...]` run inside
every rank of a real job: world sizes 1-4, and at 4 also inside the sub-groups {0,1} and {2,3}. Every rank
makes every rank's tensors from fixed seeds, so each rank knows the whole exchange it must see. The graders run
them on the implementation under test (COURSE_IMPL); `test_planted_mistakes_are_caught` (no exercise marker)
runs the same functions on the wrong answers of tests/graders/planted_ch08_long_context.py and asserts each is caught.

What the graders check:
  8.3 scatter_to / gather_from / reduce_scatter_to_sequence_parallel_region: the forward values (my rows;
      the rows of every rank in rank order; the sum over ranks of my rows) and the GRADIENTS of the backward
      pass (all-gathered; summed over ranks then my rows; all-gathered), each on tensors [seq, 2, 3] with
      different values on every rank; WHICH COLLECTIVES ran in which group (CommTracer), forward and backward
      apart: scatter_to's forward sends nothing, an all-gather moves exactly the gathered bytes, a
      reduce-scatter exactly the reduced bytes, and no all-reduce stands in for either (it gives the same
      values but twice the bytes); the promised ValueErrors for a sequence the group size does not divide.
  8.4 ring_attention: the output against full attention on the whole sequence at this rank's positions
      (zigzag and contiguous layouts, causal and not, and with scores in the hundreds where an exponential
      without the running max overflows), tolerance from float32's eps; the K/V ring (CommTracer): only
      point-to-point messages, to one ring neighbour and from the other, exactly cp-1 K/V blocks sent and
      nothing else, no collective; THE OVERLAP (helpers.course.ring_attention.TransferOverlap, the measure
      of notebook 08): every step but the last computes while a transfer is in flight, i.e. overlapped
      FLOPs / all matmul FLOPs >= (work - last-step chunk pairs) / work (>=: a send may stay in flight
      through the last step), no blocking send/recv, the transfer posted before the first matmul (p2p and
      matmul order at the dispatcher), isend/irecv imported by name traced too; the causal work
      (FlopCounterMode): no more matmul FLOPs than the
      (query chunk, key chunk) pairs the mask does not hide entirely (helpers.course.ring_attention.
      causal_work); the promised ValueErrors.

Mistakes each grader catches (each one planted in tests/graders/planted_ch08_long_context.py and asserted caught):
  8.3 sp_gather_bwd_all_reduce   gather's backward all-reduces then keeps my rows: right gradient, 2× bytes
      sp_gather_bwd_no_sum       gather's backward keeps my rows of MY gradient only (no sum over ranks)
      sp_rs_by_all_reduce        reduce-scatter done as all-reduce + my rows: right values, 2× bytes
      sp_scatter_bwd_local       scatter's backward returns my gradient with zeros elsewhere (no all-gather)
      sp_wrong_dim               gathers along the last dimension instead of the sequence
      sp_floor_rows              an uneven sequence split with floor division, no ValueError
  8.4 ring_all_gather            K/V all-gathered, attention computed locally: no ring
      ring_no_rescale            running sum and output not rescaled when the max grows
      ring_no_max                exponentials without subtracting the running max: overflow on large scores
      ring_local_mask            causal mask by local row index instead of global position
      ring_no_skip               masked-out chunk pairs computed anyway: right output, unbalanced work
      ring_forward_last          the last block forwarded too: cp blocks sent instead of cp-1
      ring_send_after_compute    each block sent only after computing with it: no overlap
      ring_wait_before_compute   each step's transfer posted, then waited for, then computed: no overlap
                                 (the old check, first p2p before first matmul, passed it)
      ring_overlap_first_step_only  the first step overlaps, later ones wait first (passed the old check)
      ring_blocking_send_recv    blocking dist.send/dist.recv: nothing can overlap (passed the old check)
      ring_ignores_order         the zigzag layout treated as contiguous
      ring_no_errors             an unknown order accepted without ValueError
"""
import contextlib
import math

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from helpers import launch, load_impl
from helpers.claims import max_abs_diff, tolerance
from helpers.comm_trace import CommTracer
from helpers.course.ring_attention import (ORDERS, TransferOverlap, attention_reference, causal_work, chunks_of_rank,
                                           positions_of_rank)
from tests.graders.planted import assert_no_failures, grouped_job, planted_tests

# Rounding budget (helpers.claims policy): the reduce-scatter sums ≤ 4 terms; ring attention sums softmax
# terms over ≤ 24 keys and head_dim 4, rescaled once per chunk pair: a few ulps, 64 leaves room.
FACTOR = 64
SP = "labs/sequence_parallel.py: the sequence-parallel operators"
RING = "labs/context_parallel.py: ring_attention"
GATHERS = {"all_gather", "all_gather_into_tensor", "all_gather_single"}
REDUCE_SCATTERS = {"reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single"}
P2P_SEND, P2P_RECV = {"send", "isend"}, {"recv", "irecv"}
TAIL = (2, 3)           # trailing dimensions of the sequence-parallel tensors: [seq, 2, 3]
ROWS = 3                # rows per rank in the 8.3 checks
HEADS, HEAD_DIM, CHUNK = 2, 4, 3


def _cp(impl):
    return impl.context_parallel if impl is not None else load_impl("context_parallel")


def _sp(impl):
    return impl.sequence_parallel if impl is not None else load_impl("sequence_parallel")


def _seeded(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _group_info(group):
    ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))
    return ranks, dist.get_rank(group), len(ranks)


def _comm_failures(where, records, allowed, want_payload, ranks, hint):
    """Every record is one of `allowed` in `ranks`, and their payloads add up to `want_payload` bytes."""
    failures = []
    ops = [r.op for r in records]
    wrong = [r for r in records if r.op not in allowed]
    if wrong:
        failures.append(f"{where}: ran {[r.op for r in wrong]}, expected only {sorted(allowed)} — {hint}")
    elsewhere = [r for r in records if tuple(r.ranks) != tuple(ranks)]
    if elsewhere:
        failures.append(f"{where}: ran {[(r.op, list(r.ranks)) for r in elsewhere]} outside the group "
                        f"{list(ranks)} — pass group= to every collective")
    got = sum(r.payload for r in records if r.op in allowed)
    if not wrong and got != want_payload:
        failures.append(f"{where}: {ops} moved a payload of {got} B, expected {want_payload} B — {hint}")
    return failures


# ------------------------------------------------------------------------- 8.3 sequence parallelism

def _traced_backward(y, grad, where, failures):
    """Backward of y with `grad`, traced; an error becomes a failure that says what the gradient must be."""
    with CommTracer() as trace:
        try:
            y.backward(grad)
        except NotImplementedError:
            raise
        except Exception as exc:
            failures.append(f"{where} backward raised {type(exc).__name__}: {exc} — the gradient must have the "
                            f"input's shape, rows along the sequence (dim 0) ({SP})")
    return trace.records


def check_sp(impl, rank, world_size, group=None, label="WORLD"):
    """The three sequence-parallel operators in `group`: forward values, gradients, and the collectives."""
    cp, failures = _sp(impl), []
    ranks, r, n = _group_info(group)
    seq, where = n * ROWS, f"[8.3 {label}, rank {rank}]"
    mine = slice(r * ROWS, (r + 1) * ROWS)
    full_bytes = seq * math.prod(TAIL) * 4

    # scatter_to: forward keeps my rows without communicating; backward all-gathers the gradient.
    x = _seeded(0, seq, *TAIL).requires_grad_()
    with CommTracer() as trace:
        y = cp.scatter_to_sequence_parallel_region(x, group)
    if tuple(y.shape) != (ROWS, *TAIL) or not torch.equal(y.detach(), x.detach()[mine]):
        failures.append(f"{where} scatter_to forward: expected rows {mine.start}..{mine.stop - 1} of x "
                        f"{(ROWS, *TAIL)}, got shape {tuple(y.shape)} — keep this rank's contiguous rows ({SP})")
    if trace.records:
        failures.append(f"{where} scatter_to forward ran {[t.op for t in trace.records]}: every rank already "
                        f"holds x, keeping its rows needs no communication ({SP})")
    grads = [_seeded(100 + ranks[j], ROWS, *TAIL) for j in range(n)]
    records = _traced_backward(y, grads[r], f"{where} scatter_to", failures) if not failures else []
    if not failures:
        if x.grad is None or not torch.equal(x.grad, torch.cat(grads)):
            failures.append(f"{where} scatter_to backward: dL/dx must be every rank's gradient rows all-gathered "
                            f"along the sequence (dim 0) in rank order (max |diff| "
                            f"{max_abs_diff(x.grad, torch.cat(grads)) if x.grad is not None else 'no grad'}) ({SP})")
        if n > 1:
            failures += _comm_failures(f"{where} scatter_to backward", records, GATHERS, full_bytes, ranks,
                                       f"the backward of keeping my rows is an all-gather of {full_bytes} B ({SP})")

    # gather_from: forward all-gathers; backward reduce-scatters (the sum over ranks of my rows).
    parts = [_seeded(200 + ranks[j], ROWS, *TAIL) for j in range(n)]
    x = parts[r].clone().requires_grad_()
    with CommTracer() as trace:
        y = cp.gather_from_sequence_parallel_region(x, group)
    if tuple(y.shape) != (seq, *TAIL) or not torch.equal(y.detach(), torch.cat(parts)):
        failures.append(f"{where} gather_from forward: expected every rank's rows in rank order along the "
                        f"sequence (dim 0), shape {(seq, *TAIL)}, got shape {tuple(y.shape)} ({SP})")
        return failures
    if n > 1:
        failures += _comm_failures(f"{where} gather_from forward", trace.records, GATHERS, full_bytes, ranks,
                                   f"one all-gather of the {full_bytes} B sequence ({SP})")
    upstream = [_seeded(300 + ranks[j], seq, *TAIL) for j in range(n)]
    records = _traced_backward(y, upstream[r], f"{where} gather_from", failures)
    want = sum(u[mine] for u in upstream)
    if x.grad is None or max_abs_diff(x.grad, want) > tolerance(want, torch.float32, FACTOR):
        got = max_abs_diff(x.grad, want) if x.grad is not None else "no grad"
        failures.append(f"{where} gather_from backward: dL/dx must be the sum over ranks of their gradients' "
                        f"rows {mine.start}..{mine.stop - 1} (every rank's column-parallel layer gave a partial "
                        f"gradient), max |diff| {got} ({SP})")
    if n > 1:
        failures += _comm_failures(f"{where} gather_from backward", records, REDUCE_SCATTERS, full_bytes, ranks,
                                   f"the conjugate of the all-gather is a reduce-scatter of {full_bytes} B; an "
                                   f"all-reduce + slice gives the same gradient for twice the bytes ({SP})")

    # reduce_scatter_to: forward sums the partial rows and keeps mine; backward all-gathers.
    partials = [_seeded(400 + ranks[j], seq, *TAIL) for j in range(n)]
    x = partials[r].clone().requires_grad_()
    with CommTracer() as trace:
        y = cp.reduce_scatter_to_sequence_parallel_region(x, group)
    want = sum(p[mine] for p in partials)
    if tuple(y.shape) != (ROWS, *TAIL) or max_abs_diff(y.detach(), want) > tolerance(want, torch.float32, FACTOR):
        failures.append(f"{where} reduce_scatter_to forward: expected the sum over ranks of rows "
                        f"{mine.start}..{mine.stop - 1}, shape {(ROWS, *TAIL)}, got shape {tuple(y.shape)} ({SP})")
        return failures
    if n > 1:
        failures += _comm_failures(f"{where} reduce_scatter_to forward", trace.records, REDUCE_SCATTERS,
                                   full_bytes, ranks, f"one reduce-scatter of the {full_bytes} B partial sums; an "
                                   f"all-reduce + slice gives the same rows for twice the bytes ({SP})")
    grads = [_seeded(500 + ranks[j], ROWS, *TAIL) for j in range(n)]
    records = _traced_backward(y, grads[r], f"{where} reduce_scatter_to", failures)
    if x.grad is None or not torch.equal(x.grad, torch.cat(grads)):
        failures.append(f"{where} reduce_scatter_to backward: dL/dx must be every rank's gradient rows "
                        f"all-gathered in rank order ({SP})")
    if n > 1:
        failures += _comm_failures(f"{where} reduce_scatter_to backward", records, GATHERS, full_bytes, ranks,
                                   f"the conjugate of a reduce-scatter is an all-gather of {full_bytes} B ({SP})")
    return failures


def check_sp_errors(impl, rank, world_size, group=None, label="WORLD"):
    cp, failures = _sp(impl), []
    _, _, n = _group_info(group)
    if n == 1:
        return failures
    uneven = torch.zeros(n * ROWS + 1, *TAIL)
    for name in ("scatter_to_sequence_parallel_region", "reduce_scatter_to_sequence_parallel_region"):
        try:
            getattr(cp, name)(uneven, group)
            failures.append(f"[8.3 {label}, rank {rank}] {name} of a sequence of {n * ROWS + 1} rows over {n} "
                            f"ranks raised no ValueError — the docstring promises one ({SP})")
        except ValueError:
            pass
        except Exception as exc:
            failures.append(f"[8.3 {label}, rank {rank}] {name} of a sequence of {n * ROWS + 1} rows over {n} "
                            f"ranks raised {type(exc).__name__}: {exc} — the docstring promises a ValueError that "
                            f"says what is wrong, before any communication ({SP})")
    return failures


# ------------------------------------------------------------------------------- 8.4 ring attention

def _attention_inputs(seq, seed, scale=1.0):
    return [_seeded(seed + i, HEADS, seq, HEAD_DIM) * scale for i in range(3)]


class _OpOrder(TorchDispatchMode):
    """The order in which matmuls and point-to-point c10d operators reach the dispatcher."""
    MATMULS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.MATMULS:
            self.ops.append("matmul")
        elif name in ("c10d::send", "c10d::recv_"):
            self.ops.append("p2p")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _traced_by_name(fn):
    """While the tracers are on: a learner's module that did `from torch.distributed import isend, ...` calls
    the traced functions too (the tracers replace the attributes of torch.distributed, not names bound before)."""
    from torch.distributed import distributed_c10d as c10d
    names = ("isend", "irecv", "batch_isend_irecv", "P2POp", "send", "recv")
    scope = getattr(fn, "__globals__", {})
    swapped = {key: value for key, value in scope.items()
               if any(value is getattr(c10d, name, None) for name in names)}
    for key, value in swapped.items():
        scope[key] = getattr(dist, value.__name__)
    try:
        yield
    finally:
        scope.update(swapped)


def check_ring(impl, rank, world_size, group=None, label="WORLD"):
    """ring_attention in `group`: values against full attention, the K/V ring, the causal work."""
    cp_mod, failures = _cp(impl), []
    ranks, r, n = _group_info(group)
    seq = 2 * n * CHUNK
    cases = [(order, causal, 1.0) for order in ORDERS for causal in (True, False)] + [("zigzag", True, 30.0)]
    wrong = {}          # case -> (where, max |diff|, bound): values that differ from full attention
    for order, causal, scale in cases:
        where = f"[8.4 {label}, rank {rank}, order={order}, causal={causal}" + (f", scores ×{scale ** 2:g}]"
                                                                                 if scale != 1 else "]")
        q, k, v = _attention_inputs(seq, 7, scale)
        positions = positions_of_rank(seq, r, n, order)
        local = [t[:, positions].contiguous() for t in (q, k, v)]
        flops, order_log, meter = FlopCounterMode(display=False), _OpOrder(), TransferOverlap()
        with CommTracer() as trace, flops, order_log, meter, _traced_by_name(cp_mod.ring_attention):
            try:
                out = cp_mod.ring_attention(*local, group=group, causal=causal, order=order)
            except NotImplementedError:
                raise
            except Exception as exc:
                failures.append(f"{where} raised {type(exc).__name__}: {exc} ({RING})")
                continue
        want = attention_reference(q, k, v, causal)[:, positions]
        if tuple(out.shape) != tuple(want.shape):
            failures.append(f"{where}: output shape {tuple(out.shape)}, expected {tuple(want.shape)} ({RING})")
            continue
        diff, tol = max_abs_diff(out, want), tolerance(want, torch.float32, FACTOR)
        if not diff <= tol:
            wrong[(order, causal, scale)] = (where, diff, tol)
        messages = _ring_messages(where, trace.records, ranks, r, n, local[1].numel() * 4 * 2)
        if causal and scale == 1:
            pair_flops = 2 * 2 * HEADS * CHUNK * CHUNK * HEAD_DIM      # q·kᵀ and p·v of one chunk pair
            allowed = causal_work(seq, n, order)[r] * pair_flops
            got = flops.get_total_flops()
            if got > allowed:
                messages.append(f"{where}: {got} matmul FLOPs, expected at most {allowed} "
                                f"({causal_work(seq, n, order)[r]} unmasked chunk pairs) — skip every (query chunk, "
                                f"key chunk) pair the causal mask hides entirely ({RING})")
        failures += messages
        if n > 1 and not messages:          # the overlap's measure assumes the ring and the work are right
            failures += _overlap(where, trace.records, order_log.ops, meter, ranks, r, n, seq, order, causal)
    if wrong:
        failures.insert(0, _diagnose(wrong))
    return failures


def _diagnose(wrong):
    """One message for the cases whose values are wrong, pointing at the likely cause from which cases fail."""
    where, diff, tol = next(iter(wrong.values()))
    if set(wrong) == {("zigzag", True, 30.0)}:
        hint = "with scores this large exp(s) overflows unless the running max is subtracted first"
    elif any(not causal for _, causal, _ in wrong):
        hint = "even without a mask: rescale the running sum and output by e^(m-m') whenever the running max grows"
    elif ("contiguous", True, 1.0) not in wrong:
        hint = ("right in the contiguous layout, wrong in the zigzag one: find the rows' chunks from the layout "
                "`order` (chunks_of_rank), for the queries and for every K/V block")
    else:
        hint = "wrong only under the causal mask: mask by GLOBAL position (chunk index), not by row index"
    cases = ", ".join(f"order={o} causal={c}" + (f" scores ×{s ** 2:g}" if s != 1 else "") for o, c, s in wrong)
    return (f"{where}: output differs from full attention at this rank's positions by {diff:.3e} (> {tol:.1e}); "
            f"wrong in: {cases} — {hint} ({RING})")


def _ring_messages(where, records, ranks, r, n, kv_bytes):
    """Only p2p; sends to one ring neighbour, receives from the other; exactly (n-1) K/V blocks sent."""
    failures = []
    collectives = [x.op for x in records if x.op not in P2P_SEND | P2P_RECV]
    if collectives:
        return [f"{where}: ran {collectives} — the K/V blocks travel around the ring by point-to-point "
                f"messages (isend/irecv), never a collective of the full K/V ({RING})"]
    if n == 1:
        if records:
            failures.append(f"{where}: sent {[x.op for x in records]} with one rank: nothing to exchange ({RING})")
        return failures
    sends = [x for x in records if x.op in P2P_SEND]
    recvs = [x for x in records if x.op in P2P_RECV]
    to = {x.peer for x in sends}
    frm = {x.peer for x in recvs}
    nxt, prv = ranks[(r + 1) % n], ranks[(r - 1) % n]
    if not ((to == {nxt} and frm == {prv}) or (to == {prv} and frm == {nxt})):
        failures.append(f"{where}: sent to global ranks {sorted(to)} and received from {sorted(frm)}; a ring sends "
                        f"to one neighbour ({nxt} or {prv}) and receives from the other ({RING})")
    sent = sum(x.payload for x in sends)
    want = (n - 1) * kv_bytes
    if sent != want:
        failures.append(f"{where}: sent {sent} B, expected {want} B = cp-1 = {n - 1} K/V blocks of {kv_bytes} B — "
                        f"the last block needs no forwarding, and nothing else travels ({RING})")
    received = sum(x.payload for x in recvs)
    if received != want:
        failures.append(f"{where}: received {received} B, expected {want} B ({n - 1} K/V blocks) ({RING})")
    return failures


def last_step_pairs(rank, cp, order, causal, forward=True):
    """The chunk pairs of the ring's last step, which passes nothing on: the compute nothing can hide behind.
    forward: blocks travel to rank+1 (at step s a rank holds rank-s's block); else to rank-1."""
    owner = (rank - (cp - 1)) % cp if forward else (rank + cp - 1) % cp
    return sum(1 for qc in chunks_of_rank(rank, cp, order) for kc in chunks_of_rank(owner, cp, order)
               if not causal or kc <= qc)


def _overlap(where, records, ops, meter, ranks, r, n, seq, order, causal):
    """Every step but the last computes while a K/V transfer is in flight (TransferOverlap, the notebook's
    measure): overlapped FLOPs / all FLOPs >= (work - last-step pairs) / work, with work the chunk pairs this
    rank computes. >= because a send may stay in flight through the last step (waited for at the end)."""
    p2p = [x for x in records if x.op in P2P_SEND | P2P_RECV]
    if any(x.op in ("send", "recv") and x.via == "dist" for x in p2p):
        return [f"{where}: dist.send/dist.recv block until the transfer is over, so no compute can overlap it — "
                f"post each step's transfer with dist.isend/dist.irecv (or dist.batch_isend_irecv) BEFORE "
                f"computing with the block you hold, and wait() for it after ({RING})"]
    if any(x.via != "dist" for x in p2p):
        return [f"{where}: the K/V messages did not go through dist.isend / dist.irecv / dist.batch_isend_irecv "
                f"(called through another module, or torch.ops.c10d?): call them as dist.isend(...) — the grader "
                f"measures the overlap of the requests those return ({RING})"]
    if "p2p" in ops and "matmul" in ops and ops.index("matmul") < ops.index("p2p"):
        return [f"{where}: the first matmul ran before the first K/V message was posted — post each step's "
                f"isend/irecv BEFORE computing with the block you hold, so the transfer overlaps the compute "
                f"({RING})"]
    over, total = meter.overlapped_flops, meter.total_flops
    work = causal_work(seq, n, order, causal)[r]
    last = last_step_pairs(r, n, order, causal, forward={x.peer for x in p2p if x.op in P2P_SEND}
                           == {ranks[(r + 1) % n]})
    if total == 0 or over * work >= total * (work - last):
        return []               # (total 0: no mm/bmm to measure, e.g. a fused attention kernel; not asked for)
    which = "no step computed" if over == 0 else "only some steps computed"
    return [f"{where}: {over / total:.0%} of the attention FLOPs ran while a K/V transfer was in flight, expected "
            f"{(work - last) / work:.0%} (every step but the last: {work - last} of {work} chunk pairs) — {which} "
            f"while the next block travelled: wait() for each step's isend/irecv only AFTER computing with the "
            f"block you hold, at every step ({RING})"]


def check_ring_errors(impl, rank, world_size, group=None, label="WORLD"):
    cp_mod, failures = _cp(impl), []
    good = torch.zeros(HEADS, 2 * CHUNK, HEAD_DIM)
    bad = {"k of another shape": (good, torch.zeros(HEADS, 2 * CHUNK + 2, HEAD_DIM), good, "zigzag"),
           "2-D q": (good[0], good[0], good[0], "zigzag"),
           "an odd number of rows": (good[:, :5], good[:, :5], good[:, :5], "zigzag"),
           "order='striped'": (good, good, good, "striped")}
    for what, (q, k, v, order) in bad.items():
        try:
            cp_mod.ring_attention(q, k, v, group=group, order=order)
            failures.append(f"[8.4 {label}, rank {rank}] ring_attention with {what} raised no ValueError — the "
                            f"docstring promises one ({RING})")
        except ValueError:
            pass
        except Exception as exc:
            failures.append(f"[8.4 {label}, rank {rank}] ring_attention with {what} raised {type(exc).__name__}: "
                            f"{exc} — the docstring promises a ValueError, before any communication ({RING})")
    return failures


# ---------------------------------------------------------------------------------------- the jobs

CHECKS = {"sp": check_sp, "sp_errors": check_sp_errors, "ring": check_ring, "ring_errors": check_ring_errors}


def _job(rank, world_size, checks, impl=None):
    """Run the named checks in the world group and, at 4 ranks, in the sub-groups {0,1} and {2,3}."""
    return grouped_job(rank, world_size, CHECKS, checks, impl)


_check_all = assert_no_failures


@pytest.mark.exercise("8.3", "The sequence-parallel region: reduce-scatter / all-gather and their conjugates")
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_sequence_parallel_region(world_size):
    _check_all(launch(_job, world_size, ["sp", "sp_errors"], show_output=False))


@pytest.mark.exercise("8.4", "Ring attention with causal masking, equal to full attention")
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ring_attention(world_size):
    _check_all(launch(_job, world_size, ["ring", "ring_errors"], show_output=False))


# ------------------------------------------------------------- planted wrong answers (not an exercise)

# Its own test of the valid alternatives and the reference below: each at its own world sizes (3 ranks: an odd ring).
planted_results, test_planted_mistakes_are_caught, _, _ = \
    planted_tests("planted_ch08_long_context", CHECKS, "solutions.context_parallel", world_size=4, ranked=True,
                  alternatives=None, reference=False)


def test_reference_and_valid_alternatives_pass():
    """Other correct ways to write the exercises pass the checks the planted mistakes fail."""
    pytest.importorskip("solutions.context_parallel", reason="the reference answers are absent")
    from tests.graders import planted_ch08_long_context as planted
    # The unmodified reference is graded by the exercise tests themselves (COURSE_IMPL=solutions in CI).
    for name, checks, sizes in [(None, ["sp_errors", "ring_errors"], (2,)), ("alt_into_tensor", ["sp"], (4,)),
                                ("alt_separate_kv_reverse_ring", ["ring"], (3, 4)),
                                ("alt_by_name_late_send_wait", ["ring"], (3,))]:
        for world_size in sizes:
            results = launch(_job, world_size, checks, planted.build(name), show_output=False, timeout=120)
            failures = [f for rank_failures in results for f in rank_failures]
            assert not failures, f"valid alternative {name!r} failed:\n" + "\n".join(failures[:5])
