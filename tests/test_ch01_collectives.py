"""Graders for chapter 1 (labs/ring_collectives.py), and checks of the communication tracer.

Each launched job runs many cases (shapes x dtypes x ops) and compares the hand-built collective with
PyTorch's own on the same inputs, so the whole file takes seconds, not one job per case. Each case also
runs under CommTracer, which checks that the exercise used point-to-point messages only.
"""
import pytest
import torch
import torch.distributed as dist

from helpers import launch, load_impl
from helpers.comm_trace import CommTracer

SHAPES = [(1,), (3,), (4,), (7,), (10,), (2, 3), (5, 4), (3, 2, 5), (257,), (0,)]
DTYPES = [torch.float32, torch.float64, torch.int64, torch.int32, torch.bfloat16, torch.float16]
P2P_ONLY = {"send", "recv", "isend", "irecv"}


def _integer_valued(shape, dtype, rank, salt=0, low=0, high=10):
    """Small whole numbers, different on every rank: sums are exact in every dtype, so the result must match
    dist.* bit for bit whatever order the additions ran in."""
    g = torch.Generator().manual_seed(1000 * rank + 17 * salt + len(shape))
    return torch.randint(low, high, shape, generator=g).to(dtype)


def _describe(what, got, expected):
    return (f"{what}: expected {expected.flatten()[:8].tolist()}... got {got.flatten()[:8].tolist()}... "
            f"(max |diff| {(got.double() - expected.double()).abs().max().item() if got.numel() else 0:g})")


def _p2p_only(tracer, what):
    used = set(tracer.counts()) - P2P_ONLY
    return [f"{what}: used {sorted(used)}; build it from send/recv (or isend/irecv) only"] if used else []


def _same(got, expected, exact=True):
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return False
    if exact:
        return torch.equal(got, expected)
    return torch.allclose(got.double(), expected.double(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- 1.1 all-reduce

def _all_reduce_cases(rank, world_size, fn_name):
    rc = load_impl("ring_collectives")
    fn = getattr(rc, fn_name)
    failures = []

    def check(what, x, op=dist.ReduceOp.SUM, group=None, exact=True):
        expected = x.clone()
        dist.all_reduce(expected, op=op, group=group)
        mine = x.clone()
        with CommTracer() as tracer:
            out = fn(mine, op=op, group=group)
        failures.extend(_p2p_only(tracer, what))
        if out is not mine:
            failures.append(f"{what}: return the tensor you were given (the all-reduce is in place)")
        if not _same(mine, expected, exact):
            failures.append(_describe(what, mine, expected))

    for shape in SHAPES:
        for dtype in DTYPES:
            check(f"SUM shape={shape} dtype={dtype}", _integer_valued(shape, dtype, rank))
    for op in (dist.ReduceOp.MAX, dist.ReduceOp.MIN, dist.ReduceOp.PRODUCT):
        for shape, dtype in [((7,), torch.float32), ((3, 5), torch.int64)]:
            check(f"{op} shape={shape} dtype={dtype}", _integer_valued(shape, dtype, rank, low=1, high=4), op)
    check("AVG shape=(9,) float32", _integer_valued((9,), torch.float32, rank), dist.ReduceOp.AVG)
    g = torch.Generator().manual_seed(rank)
    check("SUM of random floats shape=(1001,)", torch.randn(1001, generator=g), exact=False)
    check("SUM of a non-contiguous tensor (a transposed [4, 6])",
          _integer_valued((4, 6), torch.float32, rank).t())
    if world_size >= 3:  # a sub-group whose group ranks differ from the global ranks
        members = [0, 2] if world_size == 3 else [1, 2, 3]
        group = dist.new_group(members)
        if rank in members:
            check(f"SUM in sub-group {members} shape=(5,)", _integer_valued((5,), torch.float32, rank),
                  group=group)
    return failures


def _assert_no_failures(failures, world_size):
    """Each rank returns the list of cases it got wrong; report the first few of the first failing rank."""
    for rank, rank_failures in enumerate(failures):
        assert not rank_failures, f"world_size={world_size}, rank {rank}: " + "\n".join(rank_failures[:5])


@pytest.mark.exercise("1.1", "Ring all-reduce from send/recv")
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ring_all_reduce(world_size):
    failures = launch(_all_reduce_cases, world_size, "ring_all_reduce", show_output=False)
    _assert_no_failures(failures, world_size)


# ------------------------------------------------------------------------------------- 1.2 all-gather

def _all_gather_cases(rank, world_size):
    rc = load_impl("ring_collectives")
    failures = []
    for shape in [(1,), (3,), (2, 3), (4, 1, 2), (0, 3), (100,)]:
        for dtype in [torch.float32, torch.int64, torch.bfloat16]:
            what = f"input shape={shape} dtype={dtype}"
            x = _integer_valued(shape, dtype, rank)
            expected = torch.empty((world_size * shape[0], *shape[1:]), dtype=dtype)
            dist.all_gather_single(expected, x)
            out = torch.full_like(expected, -1)
            with CommTracer() as tracer:
                returned = rc.ring_all_gather(out, x)
            failures.extend(_p2p_only(tracer, what))
            if returned is not out:
                failures.append(f"{what}: return `output`")
            if not _same(out, expected):
                failures.append(_describe(what, out, expected))
    try:
        rc.ring_all_gather(torch.empty(world_size * 2 + 1), torch.ones(2))
        failures.append("output of the wrong size: raise ValueError saying which shape was expected")
    except ValueError:
        pass
    return failures


@pytest.mark.exercise("1.2", "Ring all-gather from send/recv")
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ring_all_gather(world_size):
    failures = launch(_all_gather_cases, world_size, show_output=False)
    _assert_no_failures(failures, world_size)


# --------------------------------------------------------------------------------- 1.3 reduce-scatter

def _reduce_scatter_cases(rank, world_size):
    rc = load_impl("ring_collectives")
    failures = []
    cases = [((m, *rest), dtype, dist.ReduceOp.SUM) for m, rest in [(1, ()), (3, ()), (2, (3,)), (1, (2, 2)), (0, ()),
                                                                   (50, ())]
             for dtype in [torch.float32, torch.int64, torch.bfloat16]]
    cases += [((3,), torch.float32, dist.ReduceOp.MAX), ((2, 2), torch.int64, dist.ReduceOp.MIN),
              ((5,), torch.float64, dist.ReduceOp.AVG)]
    for out_shape, dtype, op in cases:
        in_shape = (world_size * out_shape[0], *out_shape[1:])
        what = f"{op} input shape={in_shape} dtype={dtype}"
        x = _integer_valued(in_shape, dtype, rank)
        before = x.clone()
        expected = torch.empty(out_shape, dtype=dtype)
        dist.reduce_scatter_single(expected, x.clone(), op=op)
        out = torch.full(out_shape, -1, dtype=dtype)
        with CommTracer() as tracer:
            returned = rc.ring_reduce_scatter(out, x, op=op)
        failures.extend(_p2p_only(tracer, what))
        if returned is not out:
            failures.append(f"{what}: return `output`")
        if not _same(out, expected):
            failures.append(_describe(what, out, expected))
        if not torch.equal(x, before):
            failures.append(f"{what}: `input` was modified; work on a copy")
    try:
        rc.ring_reduce_scatter(torch.empty(2), torch.ones(world_size * 2 + 1))
        failures.append("input of the wrong size: raise ValueError saying which shape was expected")
    except ValueError:
        pass
    return failures


@pytest.mark.exercise("1.3", "Ring reduce-scatter from send/recv")
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ring_reduce_scatter(world_size):
    failures = launch(_reduce_scatter_cases, world_size, show_output=False)
    _assert_no_failures(failures, world_size)


# ------------------------------------------------------------------------- 1.4 recursive doubling

@pytest.mark.exercise("1.4", "Recursive-doubling all-reduce (optional)")
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_recursive_doubling_all_reduce(world_size):
    failures = launch(_all_reduce_cases, world_size, "recursive_doubling_all_reduce", show_output=False)
    _assert_no_failures(failures, world_size)


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
