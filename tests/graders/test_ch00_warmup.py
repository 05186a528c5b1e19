"""Graders for chapter 0 (labs/warmup.py).

Each grader checks the numbers AND how they were obtained, from CommTracer's record of the call
(helpers/comm_trace.py). Mistakes each one catches (planted in tests/graders/planted_ch00.py and run through the
same checks by test_planted_mistakes_are_caught, which asserts each is caught with a message that points at it):
0.1 sum_of_ranks
  - the formula n(n-1)/2 and no collective;
  - the formula beside an all_reduce whose result is ignored (the grader runs it once more with every
    all_reduce's result shifted by 1000 on its way back: the answer must shift with it);
  - another collective (all_gather and a local sum), or more than one all_reduce, or a sub-group;
  - a tensor or a float returned instead of a Python int; a wrong sum.
0.2 ring_pass
  - a collective (all_gather, then picking the left neighbour's value) instead of point-to-point messages;
  - a blocking dist.send posted first on every rank: a ring of senders with nobody receiving. gloo in torch
    2.13 deadlocks on it even for 3 floats (the launcher's timeout names every rank stuck in send); a
    backend that buffers small messages would let it through, so the grader also flags the pattern itself;
  - more than one message, the wrong peer or the wrong number of bytes; the value of the wrong neighbour;
  - at world_size 1, `value` itself returned instead of a copy.
Valid alternatives pass: isend/irecv or batch_isend_irecv, in either order; blocking send/recv ordered so
that some rank receives first (e.g. even ranks send first, odd ranks receive first).
"""
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch._C._distributed_c10d import ProcessGroup

from helpers import JobTimeout, launch, load_impl
from helpers.comm_trace import CommTracer
from tests.graders.planted import assert_caught, mistake

P2P = {"send", "recv", "isend", "irecv"}
SHIFT = 1000


class _ShiftAllReduceResults:
    """Inside a rank: every all_reduce that reaches the process group returns its result + SHIFT. An answer
    computed from the all_reduce shifts with it; one computed from a formula does not."""

    def __enter__(self):
        self._saved = vars(ProcessGroup)["allreduce"]     # the raw attribute, to put back as it was
        real = getattr(ProcessGroup, "allreduce")

        def shifted(pg, tensors, *args, **kwargs):
            work = real(pg, tensors, *args, **kwargs)
            work.wait()
            for t in (tensors if isinstance(tensors, (list, tuple)) else [tensors]):
                t.add_(SHIFT)
            return work
        ProcessGroup.allreduce = shifted
        return self

    def __exit__(self, *exc):
        ProcessGroup.allreduce = self._saved
        return False


def _ops(tracer):
    return ", ".join(f"{r.op}(group={list(r.ranks)}, {r.payload} B)" for r in tracer.records) or "nothing"


# ------------------------------------------------------------------------------------ 0.1 sum_of_ranks

def _sum_of_ranks_checks(rank, world_size, impl=None):
    warmup = impl or load_impl("warmup")
    expected = world_size * (world_size - 1) // 2
    failures = []
    with CommTracer() as tracer:
        got = warmup.sum_of_ranks(rank, world_size)
    if type(got) is not int:
        failures.append(f"return a Python int (e.g. t.item()), got {type(got).__name__} {got!r}")
    elif got != expected:
        failures.append(f"expected {expected} = 0 + 1 + ... + {world_size - 1}, got {got}")
    reduces = [r for r in tracer.records if r.op == "all_reduce"]
    world = tuple(range(world_size))
    if not reduces:
        failures.append(f"no all_reduce ran (saw: {_ops(tracer)}); the ranks must talk: all_reduce a tensor "
                        f"holding this rank's id, not the formula n(n-1)/2")
    elif len(tracer.records) != 1 or reduces[0].ranks != world:
        failures.append(f"expected exactly one all_reduce over all {world_size} ranks, saw: {_ops(tracer)}")
    if not failures and world_size > 1:
        with _ShiftAllReduceResults():
            shifted = warmup.sum_of_ranks(rank, world_size)
        if shifted != expected + SHIFT:
            failures.append(f"with the all_reduce's result shifted by {SHIFT} on its way back, sum_of_ranks "
                            f"returned {shifted}, not {expected + SHIFT}: return what the all_reduce computed, "
                            f"not a formula")
    return failures


def _assert_no_failures(failures, what):
    for rank, rank_failures in enumerate(failures):
        assert not rank_failures, f"{what}, rank {rank}: " + "\n".join(rank_failures[:5])


@pytest.mark.exercise("0.1", "sum_of_ranks with one all_reduce")
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_sum_of_ranks(world_size):
    failures = launch(_sum_of_ranks_checks, world_size, show_output=False)
    _assert_no_failures(failures, f"world_size={world_size}")


# ------------------------------------------------------------------------------------- 0.2 ring_pass

CASES = [((3,), torch.float32), ((2, 5), torch.int64)]


def _value(shape, dtype, rank):
    return (torch.arange(torch.Size(shape).numel()) + 100 * rank).reshape(shape).to(dtype)


def _ring_pass_checks(rank, world_size, impl=None):
    """Worker: (failures, first point-to-point op of each case) on this rank."""
    warmup = impl or load_impl("warmup")
    failures, first_ops = [], []
    right, left = (rank + 1) % world_size, (rank - 1) % world_size
    for shape, dtype in CASES:
        what = f"shape={shape} dtype={dtype}"
        value = _value(shape, dtype, rank)
        with CommTracer() as tracer:
            got = warmup.ring_pass(rank, world_size, value)
        want = _value(shape, dtype, left)
        if not (isinstance(got, torch.Tensor) and got.dtype == dtype and got.shape == want.shape):
            failures.append(f"{what}: expected a {dtype} tensor of shape {tuple(shape)}, got {got!r}")
            continue
        if not torch.equal(got, want):
            failures.append(f"{what}: rank {rank} should hold rank {left}'s value {want.tolist()}, got {got.tolist()}")
        if world_size == 1:
            if got is value or got.data_ptr() == value.data_ptr():
                failures.append(f"{what}: with world_size 1, return a copy of `value`, not `value` itself")
            continue
        collectives = [r for r in tracer.records if r.op not in P2P]
        if collectives:
            failures.append(f"{what}: used {_ops(tracer)}; pass the value with point-to-point messages "
                            f"(dist.isend / dist.irecv or dist.batch_isend_irecv), not a collective")
            continue
        sends = [r for r in tracer.records if r.op in ("send", "isend")]
        recvs = [r for r in tracer.records if r.op in ("recv", "irecv")]
        nbytes = value.numel() * value.element_size()
        if [(r.peer, r.payload) for r in sends] != [(right, nbytes)] or \
                [(r.peer, r.payload) for r in recvs] != [(left, nbytes)]:
            failures.append(f"{what}: rank {rank} should send one message of {nbytes} B to rank {right} and "
                            f"receive one of {nbytes} B from rank {left}; saw: "
                            + ", ".join(f"{r.op} peer={r.peer} {r.payload} B" for r in sends + recvs))
        first_ops.append(next((r.op for r in tracer.records if r.op in P2P), None))
    return failures, first_ops


def _ring_pass_failures(results, world_size):
    """Per-rank failures, plus the deadlock pattern, which needs every rank's record: a blocking send first
    on every rank (a ring of senders, nobody receiving until the backend has buffered the message)."""
    failures = [list(f) for f, _ in results]
    for case, (shape, dtype) in enumerate(CASES):
        firsts = [ops[case] if case < len(ops) else None for _, ops in results]
        if world_size > 1 and all(op == "send" for op in firsts):
            failures[0].append(f"shape={shape} dtype={dtype}: every rank called a blocking dist.send before "
                               f"posting its receive: this deadlocks as soon as the backend does not buffer the "
                               f"message (NCCL, or gloo with large tensors); post isend and irecv together "
                               f"(or batch_isend_irecv), then wait on both")
    return failures


@pytest.mark.exercise("0.2", "ring_pass with isend/irecv")
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ring_pass(world_size):
    results = launch(_ring_pass_checks, world_size, show_output=False)
    _assert_no_failures(_ring_pass_failures(results, world_size), f"world_size={world_size}")


# ----------------------------------------------------- planted mistakes (not an exercise: the graders' own test)

def _planted():
    from tests.graders import planted_ch00
    return planted_ch00.PLANTED


@pytest.mark.parametrize("planted", _planted(), ids=lambda p: f"{p.exercise}-{p.name}")
def test_planted_mistakes_are_caught(planted):
    """Each wrong answer in tests/graders/planted_ch00.py, graded by its exercise's own checks, must fail with a
    message that points at its bug."""
    impl = SimpleNamespace(**planted.functions)
    try:
        if planted.exercise == "0.1":
            failures = launch(_sum_of_ranks_checks, planted.world_size, impl=impl, show_output=False)
        else:
            results = launch(_ring_pass_checks, planted.world_size, impl=impl, show_output=False,
                             timeout=5 if planted.hangs else None)
            failures = _ring_pass_failures(results, planted.world_size)
        found = "\n".join(f for rank_failures in failures for f in rank_failures)
    except JobTimeout as hung:
        assert planted.hangs, f"planted mistake {planted.name!r} hung unexpectedly: {hung}"
        found = str(hung)
    assert_caught(mistake(planted.exercise, planted.name, planted.doc, planted.caught_by), found)
