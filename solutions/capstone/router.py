"""Capstone, exercise 6.2 — the balancing policy."""
from __future__ import annotations


def choose_replica(policy: str, outstanding: list, turn: int) -> int:
    """Exercise 6.2 — the index of the replica that gets the next request.

    outstanding[i]: requests sent to replica i and not yet answered, or None while replica i is down.
    turn: a counter that grows by one per call (0, 1, 2, ...).
    policy "round_robin": the (turn mod k)-th of the k replicas that are up, in index order.
    policy "least_outstanding": a replica with the fewest outstanding requests; among several tied, the
        (turn mod k)-th of those k, in index order (so ties rotate instead of always hitting replica 0).
    Raise ValueError for another policy, or when no replica is up.
    """
    up = [i for i, n in enumerate(outstanding) if n is not None]
    if not up:
        raise ValueError("no replica is up")
    if policy == "round_robin":
        return up[turn % len(up)]
    if policy == "least_outstanding":
        fewest = min(outstanding[i] for i in up)
        tied = [i for i in up if outstanding[i] == fewest]
        return tied[turn % len(tied)]
    raise ValueError(f"policy={policy!r}: use 'round_robin' or 'least_outstanding'")
