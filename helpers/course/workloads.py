"""Request workloads for the data-parallel chapter: skewed costs and a service time that stands for them.

A request's cost is in *units*; serving it takes `cost × unit_seconds` of waiting. Waiting (not spinning)
is what an inference server's host process does while its GPU runs the request, and it keeps the
timings honest on a 2-core machine shared by 4 ranks: sleeping ranks do not compete for the cores.
"""
import time


def skewed_costs(num_tasks: int, world_size: int, heavy: float = 10.0, light: float = 1.0) -> list[float]:
    """Every `world_size`-th request is heavy (a long prompt), the rest light: the worst case for
    round-robin, which hands all the heavy ones to rank 0."""
    return [heavy if task % world_size == 0 else light for task in range(num_tasks)]


def serve(cost: float, unit_seconds: float = 0.005) -> float:
    """Serve one request of `cost` units (wait cost × unit_seconds). Returns the cost."""
    time.sleep(cost * unit_seconds)
    return cost


def ideal_makespan(costs: list[float], world_size: int) -> float:
    """A lower bound on any schedule: the total work shared perfectly, or the largest single request."""
    return max(sum(costs) / world_size, max(costs))
