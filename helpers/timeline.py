"""Record what each rank did and when, so a notebook can draw a Gantt chart of a real run.

    def worker(rank, world_size):
        tl = Timeline(rank)
        with tl.span("F", micro_batch=0):
            y = stage(x)
        return tl.events                 # launch() brings every rank's events back to the notebook

    events = [e for evs in launch(worker, 4) for e in evs]
    helpers.plots.gantt(events)

Times are time.perf_counter() (CLOCK_MONOTONIC: one clock for every process on a machine), so spans of
different ranks line up. `normalize(events)` shifts them so the job starts at 0.
"""
from __future__ import annotations

import time
from contextlib import contextmanager


class Timeline:
    def __init__(self, rank: int):
        self.rank = rank
        self.events: list[dict] = []

    @contextmanager
    def span(self, label: str, **fields):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.events.append({"rank": self.rank, "label": label, "start": start,
                                "end": time.perf_counter(), **fields})


def normalize(events: list[dict]) -> list[dict]:
    t0 = min(e["start"] for e in events)
    return [{**e, "start": e["start"] - t0, "end": e["end"] - t0} for e in events]


def busy_fraction(events: list[dict], ranks: int) -> float:
    """Share of (ranks x makespan) spent inside spans; 1 - this is the bubble (idle) fraction."""
    events = normalize(events)
    makespan = max(e["end"] for e in events)
    busy = sum(e["end"] - e["start"] for e in events)
    return busy / (ranks * makespan)
