"""Chapter 4's given baseline for load balancing: a static round-robin split, and the makespan it leads to.
Exercise 4.2 (labs/load_balance.py, `dynamic_work_queue`) is measured against it."""
from __future__ import annotations

from typing import Any, Callable


def round_robin(rank: int, world_size: int, num_tasks: int,
                run_task: Callable[[int], Any]) -> list[tuple[int, Any]]:
    """Static balancing: rank r serves tasks r, r + world_size, r + 2·world_size, ...
    Returns [(task_id, run_task(task_id)), ...] in the order this rank ran them."""
    return [(task, run_task(task)) for task in range(rank, num_tasks, world_size)]


def makespan_units(assignments: list[list[int]], costs: list[float]) -> float:
    """The finishing time of the busiest rank, in cost units: max over ranks of the summed cost of
    the tasks it ran. assignments[r] = the task ids rank r ran."""
    return max(sum(costs[t] for t in tasks) for tasks in assignments)
