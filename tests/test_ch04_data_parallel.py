"""Graders for chapter 4 (labs/data_parallel.py, labs/load_balance.py)."""
import pytest
import torch
from torch.utils.data import DistributedSampler

from helpers import launch, load_impl
from helpers.requests import ideal_makespan, serve, skewed_costs


def _requests(num_items, feature):
    return torch.arange(num_items * max(1, int(torch.tensor(feature).prod())), dtype=torch.float32) \
        .reshape(num_items, *feature) * 0.5 - 3.0


def _ordered_gather_job(rank, world_size, num_items, feature, split):
    dp = load_impl("data_parallel")
    if split == "contiguous":
        indices = dp.shard_indices(num_items, rank, world_size)
    else:  # torch's sampler: strided, padded to equal shards by repeating the first requests
        indices = list(DistributedSampler(range(num_items), num_replicas=world_size, rank=rank, shuffle=False))
    inputs = _requests(num_items, feature)[indices] if indices else torch.zeros((0, *feature))
    outputs = inputs * 2 + 1          # "the model": any per-request function
    return dp.gather_in_order(outputs, torch.tensor(indices, dtype=torch.int64), num_items)


@pytest.mark.exercise("4.1", "Ordered gather of data-parallel results")
@pytest.mark.parametrize("world_size,num_items,feature,split", [
    (1, 5, (3,), "contiguous"),
    (2, 7, (4,), "contiguous"),
    (3, 10, (2, 3), "contiguous"),
    (4, 10, (5,), "contiguous"),
    (4, 3, (2,), "contiguous"),       # more ranks than requests: one rank has nothing
    (3, 10, (4,), "sampler"),         # DistributedSampler pads 10 -> 12: two requests served twice
    (4, 5, (3,), "sampler"),
])
def test_gather_in_order(world_size, num_items, feature, split):
    results = launch(_ordered_gather_job, world_size, num_items, feature, split, show_output=False)
    expected = _requests(num_items, feature) * 2 + 1
    got = results[0]
    assert isinstance(got, torch.Tensor), f"rank 0 should return a tensor, got {got!r}"
    assert got.shape == expected.shape, \
        f"rank 0 should hold all {num_items} results, shape {tuple(expected.shape)}; got {tuple(got.shape)} " \
        f"(duplicates from the sampler's padding must be dropped)"
    assert torch.equal(got, expected), \
        f"results out of order ({split} split, world_size={world_size}): row i must answer request i"
    for rank in range(1, world_size):
        assert results[rank] is None, f"rank {rank} should return None, got {results[rank]!r}"


def _balance_job(rank, world_size, costs, unit, dynamic):
    lb = load_impl("load_balance")
    run = lambda task: serve(costs[task], unit)  # noqa: E731
    if dynamic:
        done = lb.dynamic_work_queue(len(costs), run, key="grader_queue")
    else:
        done = lb.round_robin(rank, world_size, len(costs), run)
    return [task for task, _ in done]


@pytest.mark.exercise("4.2", "Dynamic load balancer beats round-robin")
@pytest.mark.parametrize("world_size,num_tasks", [(2, 12), (4, 24)])
def test_dynamic_beats_round_robin(world_size, num_tasks):
    lb = load_impl("load_balance")
    costs = skewed_costs(num_tasks, world_size)
    unit = 0.004
    static = launch(_balance_job, world_size, costs, unit, False, show_output=False)
    dynamic = launch(_balance_job, world_size, costs, unit, True, show_output=False)
    ran = sorted(t for tasks in dynamic for t in tasks)
    assert ran == list(range(num_tasks)), \
        f"every task must run exactly once across the ranks; ran {ran}"
    # Graded in cost units (the work each rank was given), not in seconds: robust on a loaded machine.
    # Any greedy queue finishes within ideal + the largest task (Graham's bound); round-robin gives
    # rank 0 every heavy request.
    rr, dyn = lb.makespan_units(static, costs), lb.makespan_units(dynamic, costs)
    bound = ideal_makespan(costs, world_size) + max(costs)
    assert dyn <= bound and dyn < 0.75 * rr, \
        f"dynamic makespan {dyn:g} units vs round-robin {rr:g}: a queue that hands the next task to the " \
        f"first free rank should finish within {bound:g} units"


def _queue_twice_job(rank, world_size):
    lb = load_impl("load_balance")
    first = [t for t, _ in lb.dynamic_work_queue(6, lambda t: t, key="first")]
    second = [t for t, _ in lb.dynamic_work_queue(6, lambda t: t, key="second")]
    return first, second


@pytest.mark.exercise("4.2", "Dynamic load balancer beats round-robin")
def test_dynamic_queue_keys_are_independent():
    results = launch(_queue_twice_job, 2, show_output=False)
    for which in (0, 1):
        ran = sorted(t for r in results for t in r[which])
        assert ran == list(range(6)), f"queue {which}: every task exactly once, got {ran}"
