"""Graders for chapter 4 (labs/data_parallel.py, labs/load_balance.py).

Each check takes the implementation as an argument (`impl`: the module under test, or a namespace holding a
planted variant), so the same check grades the learner's code and the planted wrong answers of
tests/graders/planted_ch04.py. launch() forks: the implementation is not pickled.

What the graders catch (each one planted, see test_planted_mistakes_are_caught):
4.1 gather_in_order
  - rows concatenated in rank order, the indices ignored (a strided sampler split comes back out of order)
  - the sampler's padded duplicates kept as extra rows
  - the results shipped to every rank (all_gather / all_reduce / broadcast / all_gather_object) while only
    dst needs them: a rank other than dst must receive no other rank's results (checked with CommTracer)
  - a result returned on every rank instead of None on the ranks other than dst
  - `dst` ignored (the result always lands on rank 0)
  - `group` ignored: sizes or collectives taken from the whole world instead of the group (two groups of 2
    gather at once; every traced collective must run in the rank's own group)
  - a request answered by no rank silently returned as zeros (the docstring promises a ValueError naming it)
4.2 dynamic_work_queue
  - a static split dressed as a queue (round-robin, contiguous blocks): while one rank is stuck in a task,
    the others must take every remaining task
  - a task computed from the rank (rank + i·world) while the store counter only counts
  - several tasks claimed per store round trip
  - a counter read and then written (store.set): not atomic
  - no closing barrier (or other collective on every rank) after the last store request
  - a task run twice or never (off by one)
  - the returned pairs not in the order this rank ran them, or not (task, run_task(task))
  - and, on a skewed load, a makespan (in cost units) no better than round-robin's
"""
import time

import pytest
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d
from torch.utils.data import DistributedSampler

from helpers import launch, load_impl
from helpers.launch import RankFailed
from helpers.comm_trace import CommTracer
from helpers.course.partition import shard_indices
from helpers.course.workloads import ideal_makespan, serve, skewed_costs
from tests.graders.planted import assert_caught, mistake

# ------------------------------------------------------------------------------------------------ 4.1


def _requests(num_items, feature):
    return torch.arange(num_items * max(1, int(torch.tensor(feature).prod())), dtype=torch.float32) \
        .reshape(num_items, *feature) * 0.5 - 3.0


# Bytes a rank *receives* in one traced call: what shipping results to a rank other than dst would show.
# (gather, reduce, send: nothing arrives at a rank other than dst; broadcast counts for every rank, the
# tracer does not record its src.)
def _received(record, nranks):
    op, payload = record.op, record.payload
    if op in ("all_reduce", "broadcast", "recv", "irecv", "scatter"):
        return payload
    if op in ("all_gather", "all_gather_into_tensor", "all_gather_single", "all_to_all", "all_to_all_single"):
        return payload * (nranks - 1) // nranks
    if op in ("reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single"):
        return payload // nranks
    return 0


class _ObjectCollectives:
    """CommTracer sees tensor collectives; this adds the pickled-object ones that deliver data to every rank
    (all_gather_object, broadcast_object_list), counting the pickled size of what arrived."""
    NAMES = ("all_gather_object", "broadcast_object_list")

    def __enter__(self):
        import pickle
        self.records, self._saved = [], {}
        for name in self.NAMES:
            fn = self._saved[name] = getattr(dist, name)

            def traced(objs, *args, _fn=fn, _name=name, **kwargs):
                out = _fn(objs, *args, **kwargs)
                self.records.append((_name, len(pickle.dumps(objs))))
                return out
            setattr(dist, name, traced)
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        return False


def _gather_job(rank, world_size, impl, num_items, feature, split, dst, unanswered):
    if split == "contiguous":
        indices = shard_indices(num_items, rank, world_size)
    else:  # torch's sampler: strided, padded to equal shards by repeating the first requests
        indices = list(DistributedSampler(range(num_items), num_replicas=world_size, rank=rank, shuffle=False))
    indices = [i for i in indices if i != unanswered]
    inputs = _requests(num_items, feature)[indices] if indices else torch.zeros((0, *feature))
    outputs = inputs * 2 + 1          # "the model": any per-request function
    error = None
    with CommTracer() as trace, _ObjectCollectives() as objects:
        try:
            got = impl.gather_in_order(outputs, torch.tensor(indices, dtype=torch.int64), num_items, dst=dst)
        except NotImplementedError:
            raise
        except Exception as exc:  # noqa: BLE001 — graded below: only the promised ValueError on dst is right
            got, error = None, (type(exc).__name__, str(exc))
    received = sum(_received(r, len(r.ranks)) for r in trace.records)
    shipped = [f"{r.op} ({_received(r, len(r.ranks)):,d} B)" for r in trace.records if _received(r, len(r.ranks))]
    received += sum(n for _, n in objects.records)
    shipped += [f"{name} ({n:,d} B)" for name, n in objects.records]
    return {"result": got, "error": error, "received": received, "shipped": shipped}


ROW_BYTES_CHECKED = 256


def _run(case, fn, world_size, *args):
    """launch(), with a rank's crash reported as a failure of `case` (a stub's NotImplementedError is let
    through: the grade reports it as "not started")."""
    try:
        return launch(fn, world_size, *args, show_output=False)
    except RankFailed as exc:
        if exc.exc_type == "NotImplementedError":
            raise
        what = f"raised {exc.exc_type}: {exc.message}" if exc.exc_type else exc.message
        raise AssertionError(f"{case}: rank {exc.rank} {what}".strip()) from None


def check_gather(impl, world_size, num_items, feature, split="contiguous", dst=0):
    """Rank dst holds every result at its request's index; the others return None and receive no results."""
    case = f"world_size={world_size}, {num_items} requests, {split} split, dst={dst}"
    results = _run(case, _gather_job, world_size, impl, num_items, feature, split, dst, None)
    for rank, r in enumerate(results):
        assert r["error"] is None, f"{case}: rank {rank} raised {r['error'][0]}: {r['error'][1]}"
    expected = _requests(num_items, feature) * 2 + 1
    got = results[dst]["result"]
    assert isinstance(got, torch.Tensor), \
        f"{case}: rank {dst} (dst={dst}) should return the gathered tensor, got {got!r} — is `dst` honoured?"
    assert got.shape == expected.shape, \
        f"{case}: rank {dst} should hold all {num_items} results, shape {tuple(expected.shape)}; got " \
        f"{tuple(got.shape)} (duplicates from the sampler's padding must be dropped; padding rows too)"
    if not torch.equal(got, expected):
        wrong = [i for i in range(num_items) if not torch.equal(got[i], expected[i])]
        raise AssertionError(f"{case}: results out of order: rows {wrong[:8]} do not answer their request "
                             f"(row i must hold the result for request i: place rows by their indices)")
    for rank, r in enumerate(results):
        if rank != dst:
            assert r["result"] is None, f"{case}: rank {rank} should return None (only dst={dst} holds the " \
                                        f"result), got {type(r['result']).__name__}"
    # Checked where one row outweighs any bookkeeping (counts, indices: a few bytes per request).
    row_bytes = expected[0].numel() * expected.element_size()
    for rank, r in enumerate(results):
        if row_bytes >= ROW_BYTES_CHECKED and rank != dst and r["received"] >= row_bytes:
            raise AssertionError(
                f"{case}: rank {rank} received {r['received']:,d} B of other ranks' results through "
                f"{', '.join(r['shipped'])}; only dst={dst} needs them. Ship the results to dst only "
                f"(dist.gather, or send/recv); a few bytes of counts for padding are fine")


def check_gather_reports_missing(impl, world_size=3, num_items=7, unanswered=4, dst=1):
    """A request that no rank answered: ValueError on dst naming it (the docstring's promise)."""
    case = f"world_size={world_size}, {num_items} requests, request {unanswered} answered by no rank, dst={dst}"
    results = _run(case, _gather_job, world_size, impl, num_items, (3,), "contiguous", dst, unanswered)
    error = results[dst]["error"]
    got = results[dst]["result"]
    assert error is not None, f"{case}: rank {dst} should raise ValueError naming request {unanswered}, but it " \
                              f"returned {tuple(got.shape) if isinstance(got, torch.Tensor) else got!r} " \
                              f"(row {unanswered} left as zeros?)"
    assert error[0] == "ValueError", f"{case}: expected ValueError on dst, got {error[0]}: {error[1]}"
    assert str(unanswered) in error[1], f"{case}: the ValueError should name the missing request " \
                                        f"{unanswered}: {error[1]!r}"


GROUPS = [[0, 1], [2, 3]]


def _group_gather_job(rank, world_size, impl, num_items):
    groups = [dist.new_group(members) for members in GROUPS]       # every rank creates both, in order
    which = next(i for i, members in enumerate(GROUPS) if rank in members)
    members = GROUPS[which]
    indices = shard_indices(num_items, members.index(rank), len(members))
    outputs = (_requests(num_items, (64,)) * 2 + 1 + 100 * which)[indices]
    with CommTracer() as trace:
        got = impl.gather_in_order(outputs, torch.tensor(indices, dtype=torch.int64), num_items,
                                   dst=members[0], group=groups[which])
    return {"result": got, "groups": sorted({tuple(r.ranks) for r in trace.records})}


def check_gather_in_groups(impl, num_items=5):
    """Two groups of 2 ranks gather at the same time, each to its first (global) rank."""
    case = f"two groups {GROUPS} gathering {num_items} requests each to ranks 0 and 2 (group=...)"
    results = _run(case, _group_gather_job, 4, impl, num_items)
    for which, members in enumerate(GROUPS):
        expected = _requests(num_items, (64,)) * 2 + 1 + 100 * which
        got = results[members[0]]["result"]
        assert isinstance(got, torch.Tensor) and torch.equal(got, expected), \
            f"{case}: rank {members[0]} should hold group {members}'s {num_items} results in order; got " \
            f"{got if not isinstance(got, torch.Tensor) else tuple(got.shape)} — are sizes taken from `group`?"
        assert results[members[1]]["result"] is None, f"{case}: rank {members[1]} should return None"
        for rank in members:
            stray = [g for g in results[rank]["groups"] if g != tuple(members)]
            assert not stray, f"{case}: rank {rank} communicated in {[list(g) for g in stray]}, outside its " \
                              f"group {members}: pass `group` to every collective"


GATHER_CASES = [  # world_size, num_items, feature, split, dst
    (1, 5, (3,), "contiguous", 0),
    (2, 7, (4,), "contiguous", 0),
    (3, 10, (2, 3), "contiguous", 0),
    (4, 10, (5,), "contiguous", 0),
    (4, 3, (2,), "contiguous", 0),       # more ranks than requests: one rank has nothing
    (3, 10, (4,), "sampler", 0),         # DistributedSampler pads 10 -> 12: two requests served twice
    (4, 5, (3,), "sampler", 0),
    (3, 8, (64,), "contiguous", 2),      # the result lands on dst, not on rank 0
    (4, 10, (256,), "sampler", 1),       # big rows: ranks other than dst must receive none of them
]


@pytest.mark.exercise("4.1", "Ordered gather of data-parallel results")
@pytest.mark.parametrize("world_size,num_items,feature,split,dst", GATHER_CASES)
def test_gather_in_order(world_size, num_items, feature, split, dst):
    check_gather(load_impl("data_parallel"), world_size, num_items, feature, split, dst)


@pytest.mark.exercise("4.1", "Ordered gather of data-parallel results")
def test_gather_in_order_within_a_group():
    check_gather_in_groups(load_impl("data_parallel"))


@pytest.mark.exercise("4.1", "Ordered gather of data-parallel results")
def test_gather_in_order_names_an_unanswered_request():
    check_gather_reports_missing(load_impl("data_parallel"))


def grade_gather(impl):
    """Every 4.1 check, in the order that names a bug most precisely (for planted variants)."""
    for case in [(3, 10, (64,), "sampler", 0), (3, 8, (64,), "contiguous", 2), (4, 10, (256,), "sampler", 1)]:
        check_gather(impl, *case)
    check_gather_reports_missing(impl)
    check_gather_in_groups(impl)


# ------------------------------------------------------------------------------------------------ 4.2

class _StoreRecorder:
    """Records every store call a rank's code makes (whichever way it got the store object): patches the
    store's class for the duration. Keys starting with "__grader" are the grader's own."""
    METHODS = ("add", "set", "get", "compare_set", "delete_key", "multi_set", "multi_get")

    def __init__(self, trace):
        self.trace, self.calls = trace, []

    def __enter__(self):
        self.cls = type(distributed_c10d._get_default_store())
        self._saved = {}
        for name in self.METHODS:
            if hasattr(self.cls, name):
                fn = self._saved[name] = getattr(self.cls, name)

                def recorded(store, key, *args, _fn=fn, _name=name):
                    if not str(key).startswith("__grader"):
                        self.calls.append((_name, key, args[0] if args else None, len(self.trace.records)))
                    return _fn(store, key, *args)
                setattr(self.cls, name, recorded)
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(self.cls, name, fn)
        return False


class _CollectiveEntries:
    """Counts, in the store, every entry of a rank into a collective (its closing barrier, usually: a rank
    waiting there has no more work)."""
    NAMES = ("barrier", "all_reduce", "all_gather", "broadcast", "gather", "reduce", "all_gather_object")

    def __init__(self, store):
        self.store, self._saved = store, {}

    def __enter__(self):
        for name in self.NAMES:
            fn = self._saved[name] = getattr(dist, name)

            def wrapped(*args, _fn=fn, **kwargs):
                self.store.add("__grader_entries", 1)
                return _fn(*args, **kwargs)
            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        return False


def _queue_job(rank, world_size, impl, num_tasks, key, stuck_seconds):
    """The first task to start gets stuck until every other task is done, or every other rank has entered a
    collective since (its closing barrier: it has no more work), or `stuck_seconds` pass. With a dynamic queue the
    other ranks take all the remaining tasks meanwhile; with a static split they cannot."""
    store = distributed_c10d._get_default_store()
    ran, stuck = [], []

    def run_task(task):
        ran.append(task)
        if store.add("__grader_started", 1) == 1:       # the very first task, on whichever rank starts it
            stuck.append(task)
            deadline = time.monotonic() + stuck_seconds
            entries = store.add("__grader_entries", 0)       # collectives entered before (e.g. a starting barrier)
            while store.add("__grader_done", 0) < num_tasks - 1 and \
                    store.add("__grader_entries", 0) - entries < world_size - 1 and time.monotonic() < deadline:
                time.sleep(0.002)
        else:
            store.add("__grader_done", 1)
        return f"result of {task}"

    with CommTracer() as trace, _StoreRecorder(trace) as recorder, _CollectiveEntries(store):
        done = impl.dynamic_work_queue(num_tasks, run_task, key=key)
    collectives = [(r.op, len(r.ranks)) for r in trace.records]
    return {"done": done, "ran": ran, "stuck": stuck[0] if stuck else None,
            "store_calls": recorder.calls, "collectives": collectives}


def check_dynamic_queue(impl, world_size=3, num_tasks=9, key="grader_queue", stuck_seconds=20.0):
    case = f"world_size={world_size}, {num_tasks} tasks"
    results = launch(_queue_job, world_size, impl, num_tasks, key, stuck_seconds, show_output=False)
    for rank, r in enumerate(results):
        calls = r["store_calls"]
        setters = [c for c in calls if c[0] in ("set", "multi_set") and str(c[1]).startswith(key)]
        assert not setters, \
            f"{case}: rank {rank} called store.set({setters[0][1]!r}, ...) on the queue's counter: reading the " \
            f"counter and writing it back is not atomic (two ranks can take the same task); use store.add(key, 1)"
        claims = sum(1 for c in calls if (c[0] == "add" and c[2]) or c[0] == "compare_set")
        assert claims >= len(r["ran"]), \
            f"{case}: rank {rank} ran {len(r['ran'])} tasks but claimed only {claims} time(s) from the " \
            f"store: take one task per store.add(key, 1), whenever the rank is free (not a share decided up front)"
    ran = sorted(t for r in results for t in r["ran"])
    assert ran == list(range(num_tasks)), \
        f"{case}: every task must run exactly once across the ranks; ran {ran} (stop when the counter " \
        f"reaches num_tasks, not before)"
    for rank, r in enumerate(results):
        expected = [(t, f"result of {t}") for t in r["ran"]]
        assert [tuple(p) for p in r["done"]] == expected, \
            f"{case}: rank {rank} must return [(task_id, run_task(task_id)), ...] in the order it ran them: " \
            f"ran {r['ran']}, returned {[tuple(p) for p in r['done']]}"
    stuck_rank = next(rank for rank, r in enumerate(results) if r["stuck"] is not None)
    later = results[stuck_rank]["ran"][1:]
    assert not later, \
        f"{case}: rank {stuck_rank} was stuck in task {results[stuck_rank]['stuck']} while the other ranks were " \
        f"free, yet it ran tasks {later} afterwards: they were decided in advance (a static split), not " \
        f"handed to whichever rank was free"
    for rank, r in enumerate(results):
        last_store = max((c[3] for c in r["store_calls"]), default=0)
        closing = [op for op, n in r["collectives"][last_store:] if n == world_size]
        assert closing, \
            f"{case}: rank {rank} returned without a barrier after its last store request; end with " \
            f"dist.barrier() so the rank hosting the store stays up while others still ask it for work"


def _queue_twice_job(rank, world_size, impl):
    first = [t for t, _ in impl.dynamic_work_queue(6, lambda t: t, key="first")]
    second = [t for t, _ in impl.dynamic_work_queue(6, lambda t: t, key="second")]
    return first, second


def check_queue_keys_are_independent(impl):
    results = launch(_queue_twice_job, 2, impl, show_output=False)
    for which in (0, 1):
        ran = sorted(t for r in results for t in r[which])
        assert ran == list(range(6)), f"two queues in one job (keys 'first', 'second'): queue {which}: every " \
                                      f"task exactly once, got {ran} — each key must name its own counter"


def _balance_job(rank, world_size, impl, costs, unit, dynamic):
    run = lambda task: serve(costs[task], unit)  # noqa: E731
    if dynamic:
        done = impl.dynamic_work_queue(len(costs), run, key="grader_balance")
    else:
        done = impl.round_robin(rank, world_size, len(costs), run)
    return [task for task, _ in done]


def check_beats_round_robin(impl, world_size, num_tasks):
    costs = skewed_costs(num_tasks, world_size)
    unit = 0.004
    static = launch(_balance_job, world_size, impl, costs, unit, False, show_output=False)
    dynamic = launch(_balance_job, world_size, impl, costs, unit, True, show_output=False)
    ran = sorted(t for tasks in dynamic for t in tasks)
    assert ran == list(range(num_tasks)), f"every task must run exactly once across the ranks; ran {ran}"
    # Graded in cost units (the work each rank was given), not in seconds: robust on a loaded machine.
    # Any greedy queue finishes within ideal + the largest task (Graham's bound); round-robin gives
    # rank 0 every heavy request.
    rr, dyn = impl.makespan_units(static, costs), impl.makespan_units(dynamic, costs)
    bound = ideal_makespan(costs, world_size) + max(costs)
    assert dyn <= bound and dyn < 0.75 * rr, \
        f"world_size={world_size}, {num_tasks} skewed tasks: dynamic makespan {dyn:g} units vs round-robin " \
        f"{rr:g}: a queue that hands the next task to the first free rank should finish within {bound:g} units"


@pytest.mark.exercise("4.2", "Dynamic load balancer beats round-robin")
@pytest.mark.parametrize("world_size,num_tasks", [(2, 8), (3, 9), (4, 12)])
def test_dynamic_queue_serves_whoever_is_free(world_size, num_tasks):
    check_dynamic_queue(load_impl("load_balance"), world_size, num_tasks)


@pytest.mark.exercise("4.2", "Dynamic load balancer beats round-robin")
@pytest.mark.parametrize("world_size,num_tasks", [(2, 12), (4, 24)])
def test_dynamic_beats_round_robin(world_size, num_tasks):
    check_beats_round_robin(load_impl("load_balance"), world_size, num_tasks)


@pytest.mark.exercise("4.2", "Dynamic load balancer beats round-robin")
def test_dynamic_queue_keys_are_independent():
    check_queue_keys_are_independent(load_impl("load_balance"))


def grade_queue(impl, stuck_seconds=20.0):
    check_dynamic_queue(impl, stuck_seconds=stuck_seconds)
    check_queue_keys_are_independent(impl)
    check_beats_round_robin(impl, 4, 24)


# ------------------------------------------------------------------------ planted mistakes (not graded)

def _with(module_name, **replacements):
    import types
    base = load_impl(module_name)        # for the given functions (round_robin, makespan_units)
    ns = types.SimpleNamespace(**{k: getattr(base, k) for k in dir(base) if not k.startswith("__")})
    for k, v in replacements.items():
        setattr(ns, k, v)
    return ns


def _planted():
    from tests.graders import planted_ch04 as p
    return p


@pytest.mark.parametrize("name", list(_planted().WRONG_GATHERS))
def test_planted_gather_mistakes_are_caught(name):
    fn, fragment = _planted().WRONG_GATHERS[name]
    with pytest.raises(AssertionError) as caught:
        grade_gather(_with("data_parallel", gather_in_order=fn))
    assert_caught(mistake("4.1", name, name.replace("_", " "), (fragment,)), caught.value)


@pytest.mark.parametrize("name", list(_planted().VALID_GATHERS))
def test_valid_gather_alternatives_pass(name):
    grade_gather(_with("data_parallel", gather_in_order=_planted().VALID_GATHERS[name]))


@pytest.mark.parametrize("name", list(_planted().WRONG_QUEUES))
def test_planted_queue_mistakes_are_caught(name):
    fn, fragment = _planted().WRONG_QUEUES[name]
    # Every planted queue is caught whatever the stuck task waits (the claims, set, order and barrier checks do not
    # depend on it, and a static split's stuck rank runs its later tasks anyway); a static split whose other ranks
    # reach their closing barrier before the stuck task starts waiting used to cost the whole 20 s.
    with pytest.raises(AssertionError) as caught:
        grade_queue(_with("load_balance", dynamic_work_queue=fn), stuck_seconds=3.0)
    assert_caught(mistake("4.2", name, name.replace("_", " "), (fragment,)), caught.value)


@pytest.mark.parametrize("name", list(_planted().VALID_QUEUES))
def test_valid_queue_alternatives_pass(name):
    grade_queue(_with("load_balance", dynamic_work_queue=_planted().VALID_QUEUES[name]))
