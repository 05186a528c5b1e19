"""Graders for chapter 1 (labs/ring_collectives.py), and checks of the communication tracer.

Each launched job runs many cases (shapes x dtypes x ops) and compares the hand-built collective with
PyTorch's own on the same inputs, so the whole file takes seconds, not one job per case. Each case also
grades the MECHANISM on every rank, from CommTracer's record of the call (helpers/comm_trace.py): which
ops ran (a collective is seen even beneath dist.*, e.g. through an alias), in which group, every message's
peer and bytes.

Mistakes each grader catches (planted in tests/graders/planted_ch01.py and run through the same checks by
test_planted_mistakes_are_caught, which asserts each is caught with a message that points at it):
1.1 ring_all_reduce
  - a built-in collective called inside (dist.all_reduce), or hidden behind an import-time alias that
    a dist.* wrapper cannot see (CommTracer sees it at the dispatcher);
  - not a ring: chunks sent straight to their owner and back ("direct exchange": right counts and bytes,
    wrong peers), or a gather to one rank and back;
  - the whole tensor passed round the ring (n-1 messages of S instead of 2(n-1) of S/n);
  - messages in another group than the one passed in;
  - AVG on an integer tensor, or an unsupported op, accepted instead of ValueError;
  - wrong values, not in place, not returned, non-contiguous tensors left unwritten (numbers).
1.2 ring_all_gather: a built-in all_gather; every block sent straight to every rank (not a ring); a wrong
  number or size of messages; no ValueError for an output of the wrong shape; wrong values.
1.3 ring_reduce_scatter: a built-in reduce_scatter; a full all-reduce then keeping one block (2(n-1)
  messages instead of n-1); not a ring; `input` modified; no ValueError for a wrong shape; wrong values.
1.4 recursive_doubling_all_reduce: a built-in all_reduce; a ring or a direct exchange instead (messages of
  S/n, or to peers other than rank XOR 2^k); every rank sending its whole tensor to every other rank
  (n-1 messages of S instead of log2 n); non-power-of-two groups not folded into rank r - p.
Valid alternatives pass: either ring direction, any chunk order, send/recv or isend/irecv or
batch_isend_irecv, empty chunks sent or skipped.
"""
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from helpers import launch, load_impl
from helpers.launch import case
from helpers.comm_trace import CommTracer
from helpers.course.partition import chunk_bounds
from tests.graders.planted import assert_caught, mistake

P2P_ONLY = {"send", "recv", "isend", "irecv"}
f32, f64, i64, i32, bf16, f16 = torch.float32, torch.float64, torch.int64, torch.int32, torch.bfloat16, torch.float16
# (shape, dtype) pairs: every dtype, lengths divisible by 4 ranks, not divisible, shorter than the group, empty.
SUM_CASES = [((1,), f32), ((3,), i64), ((4,), f64), ((7,), i32), ((10,), bf16), ((2, 3), f16), ((5, 4), f32),
             ((3, 2, 5), i64), ((257,), f32), ((0,), f32)]
QUICK_SUM_CASES = [((8,), f32), ((7,), i64)]


def _integer_valued(shape, dtype, rank, salt=0, low=0, high=10):
    """Small whole numbers, different on every rank: sums are exact in every dtype, so the result must match
    dist.* bit for bit whatever order the additions ran in."""
    g = torch.Generator().manual_seed(1000 * rank + 17 * salt + len(shape))
    return torch.randint(low, high, shape, generator=g).to(dtype)


def _describe(what, got, expected):
    return (f"{what}: expected {expected.flatten()[:8].tolist()}... got {got.flatten()[:8].tolist()}... "
            f"(max |diff| {(got.double() - expected.double()).abs().max().item() if got.numel() else 0:g})")


def _same(got, expected, exact=True):
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return False
    if exact:
        return torch.equal(got, expected)
    # Random floats summed in another order: 4 ranks' values of magnitude <= ~5, a few roundings apart.
    from helpers.claims import tolerance
    return (got.double() - expected.double()).abs().max().item() <= tolerance(expected, factor=16)


# ------------------------------------------------------------------------ checks of the mechanism

def _members(group):
    return list(range(dist.get_world_size())) if group is None else dist.get_process_group_ranks(group)


def _sends(tracer):
    """Messages this rank sent, empty ones left out (a ring may or may not send an empty chunk)."""
    return [r for r in tracer.records if r.op in ("send", "isend") and r.payload]


def _recvs(tracer):
    return [r for r in tracer.records if r.op in ("recv", "irecv") and r.payload]


def _only_p2p(what, tracer):
    """Only send/recv ran: no dist.* collective, and none beneath dist.* (an alias of one, a functional
    collective: CommTracer sees those at the dispatcher, marked via="c10d")."""
    called = sorted({r.op for r in tracer.records if r.op not in P2P_ONLY and r.via == "dist"})
    if called:
        return [f"{what}: called dist.{', dist.'.join(called)}; build it from send/recv "
                f"(isend/irecv, batch_isend_irecv) and local arithmetic only"]
    hidden = sorted({r.op for r in tracer.records if r.op not in P2P_ONLY})
    if hidden:
        return [f"{what}: a built-in collective ran beneath dist.* ({', '.join(hidden)}: an alias such as "
                f"`from torch.distributed.distributed_c10d import all_reduce`, or a functional collective); "
                f"build it from send/recv only"]
    return []


def _in_group(what, tracer, members):
    wrong = sorted({r.ranks for r in tracer.records if r.ranks != tuple(members)})
    return [f"{what}: messages went through group(s) {[list(g) for g in wrong]}, expected the group passed in, "
            f"{members} (pass `group=` to every send/recv)"] if wrong else []


def _ring_peers(what, tracer, members, rank):
    """A ring: every send goes to one neighbour in group order and every receive comes from the other."""
    if len(members) < 2:
        return []
    i, n = members.index(rank), len(members)
    nxt, prev = members[(i + 1) % n], members[(i - 1) % n]
    to, frm = {r.peer for r in _sends(tracer)}, {r.peer for r in _recvs(tracer)}
    if (to <= {nxt} and frm <= {prev}) or (to <= {prev} and frm <= {nxt}):
        return []
    return [f"{what}: rank {rank} sent to ranks {sorted(to)} and received from {sorted(frm)}; in a ring "
            f"(group {members}) rank {rank} sends only to one neighbour ({nxt} or {prev}) and receives only "
            f"from the other"]


def _messages(what, tracer, count, sizes, note):
    """This rank sent `count` messages and received `count`, each of a size in `sizes` (bytes)."""
    failures = []
    for kind, msgs in (("sent", _sends(tracer)), ("received", _recvs(tracer))):
        got = [r.payload for r in msgs]
        count_ok = len(got) in count if isinstance(count, range) else len(got) == count
        if not count_ok or any(s not in sizes for s in got):
            want = f"{count.start}-{count.stop - 1}" if isinstance(count, range) else count
            failures.append(f"{what}: {kind} {len(got)} message(s) of {sorted(set(got))} B; expected {want} "
                            f"of {sorted(sizes)} B ({note})")
    return failures


def _ring_all_reduce_traffic(what, tracer, members, rank, numel, element_size):
    n = len(members)
    if n == 1 or numel == 0:
        return _messages(what, tracer, 0, set(), "nothing to exchange")
    sizes = {(b - a) * element_size for a, b in chunk_bounds(numel, n) if b > a}
    # Shorter than the group: some chunks are empty and those steps send nothing.
    count = 2 * (n - 1) if numel >= n else range(0, 2 * (n - 1) + 1)
    return _messages(what, tracer, count, sizes, f"a ring all-reduce on {n} ranks sends 2(n-1) = {2 * (n - 1)} "
                     f"chunks of S/n: reduce-scatter then all-gather") + _ring_peers(what, tracer, members, rank)


def _recursive_doubling_traffic(what, tracer, members, rank, numel, element_size):
    n, i = len(members), members.index(rank)
    if n == 1 or numel == 0:
        return _messages(what, tracer, 0, set(), "nothing to exchange")
    p = 1 << (n.bit_length() - 1)
    if i >= p:
        peers = Counter([members[i - p]])
    else:
        peers = Counter(members[i ^ (1 << k)] for k in range(p.bit_length() - 1))
        if i + p < n:
            peers[members[i + p]] += 1
    failures = _messages(what, tracer, sum(peers.values()), {numel * element_size},
                         f"recursive doubling exchanges the whole tensor with rank XOR 2^k, log2({p}) times; "
                         f"with {n} ranks the {n - p} beyond p={p} fold into rank r - p first")
    to, frm = Counter(r.peer for r in _sends(tracer)), Counter(r.peer for r in _recvs(tracer))
    if not failures and (to != peers or frm != peers):
        failures.append(f"{what}: rank {rank} exchanged with {sorted(to.elements())}; recursive doubling in "
                        f"group {members} exchanges with {sorted(peers.elements())} (group rank XOR 2^k, "
                        f"and r ± p for the ranks beyond the largest power of two p={p})")
    return failures


def _block_ring_traffic(what, tracer, members, rank, block_bytes):
    """All-gather / reduce-scatter: n-1 steps of one block each, round the ring."""
    n = len(members)
    if n == 1 or block_bytes == 0:
        return _messages(what, tracer, 0, set(), "nothing to exchange")
    return _messages(what, tracer, n - 1, {block_bytes}, f"a ring on {n} ranks moves n-1 = {n - 1} blocks of "
                     f"{block_bytes} B") + _ring_peers(what, tracer, members, rank)


def _raises_value_error(what, call):
    try:
        call()
    except ValueError:
        return []
    except Exception as exc:                                  # noqa: BLE001 - any other error is reported
        return [f"{what}: raise ValueError as the docstring says, got {type(exc).__name__}: {exc}"]
    return [f"{what}: raise ValueError as the docstring says (nothing was raised)"]


def _assert_no_failures(failures, world_size):
    """Each rank returns the list of cases it got wrong; report the first few of the first failing rank."""
    for rank, rank_failures in enumerate(failures):
        assert not rank_failures, f"world_size={world_size}, rank {rank}: " + "\n".join(rank_failures[:5])


def _sub_group(rank, world_size):
    """A sub-group whose group ranks differ from the global ranks (all ranks must call new_group)."""
    if world_size < 3:
        return None, []
    members = [0, 2] if world_size == 3 else [1, 2, 3]
    return dist.new_group(members), members


# ------------------------------------------------------------------------------------- 1.1 all-reduce

def _all_reduce_cases(rank, world_size, fn_name="ring_all_reduce", impl=None, quick=False):
    """Worker: run every case of exercise 1.1 (or 1.4, fn_name) on this rank; return what went wrong."""
    impl = impl or load_impl("ring_collectives")
    fn = getattr(impl, fn_name)
    traffic = _recursive_doubling_traffic if fn_name == "recursive_doubling_all_reduce" else _ring_all_reduce_traffic
    failures = []

    def check(what, x, op=dist.ReduceOp.SUM, group=None, exact=True):
        expected = x.clone()
        dist.all_reduce(expected, op=op, group=group)
        mine = x.clone()
        with case(what), CommTracer() as tracer:
            out = fn(mine, op=op, group=group)
        failures.extend(_only_p2p(what, tracer) or _in_group(what, tracer, _members(group))
                        or traffic(what, tracer, _members(group), rank, x.numel(), x.element_size()))
        if out is not mine:
            failures.append(f"{what}: return the tensor you were given (the all-reduce is in place)")
        if not _same(mine, expected, exact):
            failures.append(_describe(what, mine, expected))

    for shape, dtype in (QUICK_SUM_CASES if quick else SUM_CASES):
        check(f"SUM shape={shape} dtype={dtype}", _integer_valued(shape, dtype, rank))
    group, members = _sub_group(rank, world_size)
    if rank in members:
        check(f"SUM in sub-group {members} shape=(5,)", _integer_valued((5,), torch.float32, rank), group=group)
    if not quick:
        for op, shape, dtype in [(dist.ReduceOp.MAX, (7,), f32), (dist.ReduceOp.MIN, (3, 5), i64),
                                 (dist.ReduceOp.PRODUCT, (6,), f64)]:
            check(f"{op} shape={shape} dtype={dtype}", _integer_valued(shape, dtype, rank, low=1, high=4), op)
        check("AVG shape=(9,) float32", _integer_valued((9,), torch.float32, rank), dist.ReduceOp.AVG)
        g = torch.Generator().manual_seed(rank)
        check("SUM of random floats shape=(1001,)", torch.randn(1001, generator=g), exact=False)
        check("SUM of a non-contiguous tensor (a transposed [4, 6])",
              _integer_valued((4, 6), torch.float32, rank).t())
    failures += _raises_value_error("op=AVG on an int64 tensor",
                                    lambda: fn(torch.ones(4, dtype=torch.int64), op=dist.ReduceOp.AVG))
    failures += _raises_value_error("op=BAND (not one of SUM, AVG, PRODUCT, MAX, MIN)",
                                    lambda: fn(torch.ones(4, dtype=torch.int64), op=dist.ReduceOp.BAND))
    return failures


@pytest.mark.exercise("1.1", "Ring all-reduce from send/recv")
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ring_all_reduce(world_size):
    failures = launch(_all_reduce_cases, world_size, "ring_all_reduce", show_output=False)
    _assert_no_failures(failures, world_size)


# ------------------------------------------------------------------------------------- 1.2 all-gather

def _all_gather_cases(rank, world_size, impl=None, quick=False):
    impl = impl or load_impl("ring_collectives")
    failures = []

    def check(what, x, group=None):
        members = _members(group)
        expected = torch.empty((len(members) * x.shape[0], *x.shape[1:]), dtype=x.dtype)
        dist.all_gather_single(expected, x, group=group)
        out = torch.full_like(expected, -1)
        with case(what), CommTracer() as tracer:
            returned = impl.ring_all_gather(out, x, group=group)
        failures.extend(_only_p2p(what, tracer) or _in_group(what, tracer, members)
                        or _block_ring_traffic(what, tracer, members, rank, x.numel() * x.element_size()))
        if returned is not out:
            failures.append(f"{what}: return `output`")
        if not _same(out, expected):
            failures.append(_describe(what, out, expected))

    cases = [((3,), f32), ((2, 3), i64)] if quick else \
        [((1,), f32), ((3,), i64), ((2, 3), bf16), ((4, 1, 2), f32), ((0, 3), i64), ((100,), f32)]
    for shape, dtype in cases:
        check(f"input shape={shape} dtype={dtype}", _integer_valued(shape, dtype, rank))
    group, members = _sub_group(rank, world_size)
    if rank in members:
        check(f"sub-group {members} input shape=(2, 2)", _integer_valued((2, 2), f32, rank), group=group)
    failures += _raises_value_error(f"output of shape ({world_size * 2 + 1},) for inputs of shape (2,)",
                                    lambda: impl.ring_all_gather(torch.empty(world_size * 2 + 1), torch.ones(2)))
    return failures


@pytest.mark.exercise("1.2", "Ring all-gather from send/recv")
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ring_all_gather(world_size):
    failures = launch(_all_gather_cases, world_size, show_output=False)
    _assert_no_failures(failures, world_size)


# --------------------------------------------------------------------------------- 1.3 reduce-scatter

def _reduce_scatter_cases(rank, world_size, impl=None, quick=False):
    impl = impl or load_impl("ring_collectives")
    failures = []

    def check(what, out_shape, dtype, op=dist.ReduceOp.SUM, group=None):
        members = _members(group)
        x = _integer_valued((len(members) * out_shape[0], *out_shape[1:]), dtype, rank)
        before = x.clone()
        expected = torch.empty(out_shape, dtype=dtype)
        dist.reduce_scatter_single(expected, x.clone(), op=op, group=group)
        out = torch.full(out_shape, -1, dtype=dtype)
        with case(what), CommTracer() as tracer:
            returned = impl.ring_reduce_scatter(out, x, op=op, group=group)
        failures.extend(_only_p2p(what, tracer) or _in_group(what, tracer, members)
                        or _block_ring_traffic(what, tracer, members, rank, out.numel() * out.element_size()))
        if returned is not out:
            failures.append(f"{what}: return `output`")
        if not _same(out, expected):
            failures.append(_describe(what, out, expected))
        if not torch.equal(x, before):
            failures.append(f"{what}: `input` was modified; work on a copy")

    cases = [((3,), f32, dist.ReduceOp.SUM), ((2, 2), i64, dist.ReduceOp.SUM)] if quick else \
        [((1,), f32, dist.ReduceOp.SUM), ((3,), i64, dist.ReduceOp.SUM), ((2, 3), bf16, dist.ReduceOp.SUM),
         ((1, 2, 2), f32, dist.ReduceOp.SUM), ((0,), i64, dist.ReduceOp.SUM), ((50,), f32, dist.ReduceOp.SUM),
         ((3,), f32, dist.ReduceOp.MAX), ((2, 2), i64, dist.ReduceOp.MIN), ((5,), f64, dist.ReduceOp.AVG)]
    for out_shape, dtype, op in cases:
        check(f"{op} output shape={out_shape} dtype={dtype}", out_shape, dtype, op)
    group, members = _sub_group(rank, world_size)
    if rank in members:
        check(f"SUM in sub-group {members} output shape=(3,)", (3,), f32, group=group)
    failures += _raises_value_error(f"input of shape ({world_size * 2 + 1},) for an output of shape (2,)",
                                    lambda: impl.ring_reduce_scatter(torch.empty(2), torch.ones(world_size * 2 + 1)))
    failures += _raises_value_error("op=AVG on int64 tensors",
                                    lambda: impl.ring_reduce_scatter(torch.empty(2, dtype=i64),
                                                                     torch.ones(world_size * 2, dtype=i64),
                                                                     op=dist.ReduceOp.AVG))
    return failures


@pytest.mark.exercise("1.3", "Ring reduce-scatter from send/recv")
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ring_reduce_scatter(world_size):
    failures = launch(_reduce_scatter_cases, world_size, show_output=False)
    _assert_no_failures(failures, world_size)


# ------------------------------------------------------------------------- 1.4 recursive doubling

@pytest.mark.exercise("1.4", "Recursive-doubling all-reduce", optional=True)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_recursive_doubling_all_reduce(world_size):
    failures = launch(_all_reduce_cases, world_size, "recursive_doubling_all_reduce", show_output=False)
    _assert_no_failures(failures, world_size)


# ----------------------------------------------------- planted mistakes (not an exercise: the graders' own test)

GRADERS = {"1.1": (_all_reduce_cases, ("ring_all_reduce",)), "1.2": (_all_gather_cases, ()),
           "1.3": (_reduce_scatter_cases, ()), "1.4": (_all_reduce_cases, ("recursive_doubling_all_reduce",))}


def _planted():
    from tests.graders import planted_ch01
    return planted_ch01.PLANTED


@pytest.mark.parametrize("planted", _planted(), ids=lambda p: f"{p.exercise}-{p.name}")
def test_planted_mistakes_are_caught(planted):
    """Each wrong implementation in tests/graders/planted_ch01.py, graded by its exercise's own checks on 4 ranks
    (a quick subset of the cases), must fail with a message that points at its bug."""
    worker, args = GRADERS[planted.exercise]
    failures = launch(worker, 4, *args, impl=SimpleNamespace(**planted.functions), quick=True, show_output=False)
    found = "\n".join(f for rank_failures in failures for f in rank_failures)
    assert_caught(mistake(planted.exercise, planted.name, planted.doc, planted.caught_by), found)


# ------------------------------------------------------------------------ the tracer (not an exercise)

def _traced_batch(rank, world_size):
    with CommTracer() as tracer:
        received = torch.empty(3)
        ops = [dist.P2POp(dist.isend, torch.ones(3), (rank + 1) % world_size),
               dist.P2POp(dist.irecv, received, (rank - 1) % world_size)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        dist.all_reduce(torch.ones(4))
    assert dist.P2POp.__name__ == "P2POp" and dist.batch_isend_irecv.__name__ == "batch_isend_irecv"
    return [(r.op, r.payload, r.wire) for r in tracer.records]


def test_tracer_records_batch_isend_irecv():
    records = launch(_traced_batch, 2, show_output=False)
    for rank_records in records:
        assert rank_records == [("isend", 12, 12), ("irecv", 12, 0), ("all_reduce", 16, 16)]


# ------------------------------------------------------------- chapter 1 helpers (not exercises)

def test_busbw_factors_follow_nccl_tests():
    from helpers.benchmarks.collectives import busbw_factor
    assert busbw_factor("all_reduce", 4) == 1.5 and busbw_factor("ring_all_reduce", 8) == 2 * 7 / 8
    assert busbw_factor("all_gather", 4) == 0.75 and busbw_factor("reduce_scatter", 2) == 0.5
    assert busbw_factor("broadcast", 4) == 1.0


def test_draw_collective_colours_cells_by_origin():
    import matplotlib
    matplotlib.use("Agg")
    from helpers.collective_plots import COMBINED, RANK_COLORS, draw_collective
    before = [torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0])]
    fig = draw_collective("all_reduce", before, [torch.tensor([3.0, 3.0])] * 2)
    after_colours = {tuple(p.get_facecolor()) for p in fig.axes[1].patches}
    assert after_colours == {matplotlib.colors.to_rgba(COMBINED)}
    fig = draw_collective("all_gather", before, [torch.tensor([1.0, 1.0, 2.0, 2.0])] * 2)
    after_colours = {tuple(p.get_facecolor()) for p in fig.axes[1].patches}
    assert after_colours == {matplotlib.colors.to_rgba(RANK_COLORS[0]), matplotlib.colors.to_rgba(RANK_COLORS[1])}


def test_sweep_takes_the_fastest_call_or_the_mean():
    from helpers.benchmarks.collectives import sweep, time_collective
    rows = sweep(2, ["all_reduce"], [4 << 10], repeats=2, statistic="min")
    assert [(r["op"], r["ranks"], r["bytes"]) for r in rows] == [("all_reduce", 2, 4 << 10)] and rows[0]["seconds"] > 0
    with pytest.raises(ValueError, match="statistic"):
        time_collective(0, 1, ["all_reduce"], [4 << 10], statistic="median")


def test_cost_model_counts_the_doubling_steps_of_lab_1_4():
    from helpers.collective_plots import cost_model, doubling_steps
    assert [doubling_steps(n) for n in (1, 2, 3, 4, 6, 8)] == [0, 1, 3, 2, 4, 3]   # fold + unfold when n != 2^k
    t = cost_model(4, 1000, alpha=1.0, beta=0.0)
    assert t == {"ring": 6.0, "recursive doubling": 2.0}
