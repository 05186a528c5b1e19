"""Chapter 4 — load balancing data-parallel requests of very different cost.

A static split (round-robin) decides up front who serves which request; when costs are skewed one rank
gets the heavy ones and the others wait for it. A dynamic work queue hands out the next request to
whichever rank is free. Here the queue is one shared counter in the job's torch.distributed store:
`store.add(key, 1)` is atomic, so every call returns a different number — the next request to serve.

Exercise 4.2 is `dynamic_work_queue`. `round_robin` and `makespan_units` are given
(helpers/course/static_balance.py).
"""
from typing import Any, Callable

import torch.distributed as dist
from torch.distributed import distributed_c10d

from helpers.course.static_balance import makespan_units, round_robin  # noqa: F401  (given, see there)


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
    store = distributed_c10d._get_default_store()
    done = []
    while True:
        task = store.add(key, 1) - 1
        if task >= num_tasks:
            dist.barrier()      # the store may live in rank 0: keep it up until every rank has asked its last
            return done
        done.append((task, run_task(task)))
