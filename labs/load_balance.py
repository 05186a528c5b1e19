"""Chapter 4 — load balancing data-parallel requests of very different cost.

A static split (round-robin) decides up front who serves which request; when costs are skewed one rank
gets the heavy ones and the others wait for it. A dynamic work queue hands out the next request to
whichever rank is free. Here the queue is one shared counter in the job's torch.distributed store:
`store.add(key, 1)` is atomic, so every call returns a different number — the next request to serve.

Exercise 4.2 is `dynamic_work_queue`. `round_robin` and `makespan_units` are given.
"""
from typing import Any, Callable

import torch.distributed as dist
from torch.distributed import distributed_c10d


def round_robin(rank: int, world_size: int, num_tasks: int,
                run_task: Callable[[int], Any]) -> list[tuple[int, Any]]:
    """Static balancing: rank r serves tasks r, r + world_size, r + 2·world_size, ...
    Returns [(task_id, run_task(task_id)), ...] in the order this rank ran them."""
    return [(task, run_task(task)) for task in range(rank, num_tasks, world_size)]


def dynamic_work_queue(num_tasks: int, run_task: Callable[[int], Any],
                       key: str = "work_queue") -> list[tuple[int, Any]]:
    """Exercise 4.2 — serve tasks 0..num_tasks-1 from a shared queue: each rank, whenever it is free,
    takes the next task nobody has taken yet, until none is left.

    Use the job's store as the queue: `store = distributed_c10d._get_default_store()`;
    `store.add(key, 1)` atomically increments a counter shared by all ranks and returns the new value,
    so `store.add(key, 1) - 1` is a task id no other rank will get. Stop when it is >= num_tasks.
    Every task must run exactly once across the ranks. `key` names a fresh counter (use a new key for
    each queue in the same job). End with dist.barrier(): with env:// rendezvous (and in many servers) rank 0
    hosts the store, so it must not leave while another rank may still ask the store for work. Call it on
    every rank; returns [(task_id, run_task(task_id)), ...] for the tasks this rank ran, in the order it ran them.
    """
    raise NotImplementedError("Exercise 4.2: dynamic_work_queue is not written yet (labs/load_balance.py)")


def makespan_units(assignments: list[list[int]], costs: list[float]) -> float:
    """The finishing time of the busiest rank, in cost units: max over ranks of the summed cost of
    the tasks it ran. assignments[r] = the task ids rank r ran."""
    return max(sum(costs[t] for t in tasks) for tasks in assignments)
