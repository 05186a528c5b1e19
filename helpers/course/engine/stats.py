"""Latency figures, defined once: the percentile every chapter prints, and the result of a run.

`percentile(values, q)` interpolates linearly between the sorted values (numpy's default, "linear"); printed as
"p99" everywhere in the course. With 20 values, p99 is nearly the maximum: send enough requests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["percentile", "StepRecord", "EngineResult", "PERCENTILE_METHOD"]

PERCENTILE_METHOD = "linear interpolation (numpy's default)"


def percentile(values, q: float) -> float:
    """The q-th percentile (0-100) of `values` by linear interpolation between the sorted values; NaN if empty."""
    values = sorted(values)
    if not values:
        return math.nan
    rank = (len(values) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


@dataclass(frozen=True)
class StepRecord:
    """One engine step: when it started, its seconds (modelled or measured), what it computed.
    decodes: rids that computed their one next token; chunks: ((rid, tokens), ...) of prompt chunks (or a
    preempted request's recomputation); preempted: rids preempted in the step."""
    start: float
    seconds: float
    decodes: tuple
    chunks: tuple
    preempted: tuple = ()

    @property
    def prefill_tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    @property
    def tokens(self) -> int:
        return len(self.decodes) + self.prefill_tokens


class EngineResult:
    """A run's requests (each with its token_times) and steps (StepRecord, in order)."""

    def __init__(self, requests: list, steps: list, label: str = ""):
        self.requests, self.steps, self.label = requests, steps, label

    def _chosen(self, rids):
        return [r for r in self.requests if rids is None or r.rid in rids]

    def itls(self, rids=None) -> list[float]:
        """Every gap between two consecutive tokens of a request (of `rids`, default all), sorted."""
        return sorted(gap for r in self._chosen(rids) for gap in r.itls())

    def ttfts(self, rids=None) -> list[float]:
        return sorted(r.token_times[0] - r.arrival for r in self._chosen(rids) if r.token_times)

    @property
    def tokens(self) -> dict:
        """{rid: generated token ids}."""
        return {r.rid: list(r.tokens) for r in self.requests}

    def summary(self) -> dict:
        itl, ttft = self.itls(), self.ttfts()
        end = max(r.token_times[-1] for r in self.requests if r.token_times)
        generated = sum(len(r.tokens) for r in self.requests)
        return {"steps": len(self.steps), "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
                "itl_max": max(itl) if itl else math.nan, "ttft_p50": percentile(ttft, 50),
                "ttft_p99": percentile(ttft, 99), "makespan": end, "tok_per_s": generated / end if end else math.nan,
                "max_step_tokens": max(s.tokens for s in self.steps)}
