"""The capstone's plan (chapter 6): how many data-parallel replicas, pipeline stages and tensor-parallel ranks.
Exercise 6.1 (labs/capstone/plan.py) checks a plan against a model and lays out its ranks."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """dp data-parallel replicas, each split over pp pipeline stages of tp tensor-parallel ranks."""
    dp: int = 1
    pp: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp
