"""What differs between a live server and a modelled run: the clock that stamps every token.

    WallClock()                 time.monotonic(): a server's replicas, a benchmark on this machine
    ModelledClock(DeviceCost()) modelled device time: each step advances the clock by what its forward would cost
                                on an accelerator (`step_seconds`), so latencies hold on a busy 2-core machine

`step_seconds` prices one step with chapter 6's DeviceCost: the weights are read once per step (the larger of
the decode and prefill fixed costs when a step has both), and every decode and every prompt token adds its own
cost. A decode-only step costs DeviceCost.seconds(batch, 1); a prefill-only one DeviceCost.seconds(1, n).
Attention's quadratic term is left out: at the tiny Llama's sizes the weights dominate. Modelled, by
construction: what it shows is a schedule's effect, not this machine's speed.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from helpers.course.serving.device_time import DeviceCost

__all__ = ["WallClock", "ModelledClock", "step_seconds"]


def _device_cost():
    # imported when used: helpers.course.serving imports this package (its ServeConfig), so importing it at the
    # top made `import helpers.course.engine` circular whenever the engine was imported first
    from helpers.course.serving.device_time import DeviceCost
    return DeviceCost()


def step_seconds(decodes: int, prefill_tokens: int, cost: DeviceCost | None = None) -> float:
    """Modelled device seconds of one forward computing `decodes` decode tokens (one per request) and
    `prefill_tokens` prompt tokens (chunks, or a preempted request's recomputation)."""
    cost = cost or _device_cost()
    if decodes < 0 or prefill_tokens < 0 or decodes + prefill_tokens == 0:
        raise ValueError(f"a step computes at least one token: decodes={decodes}, prefill_tokens={prefill_tokens}")
    if prefill_tokens == 0:
        fixed = cost.decode_ms
    elif decodes == 0:
        fixed = cost.prefill_ms
    else:
        fixed = max(cost.decode_ms, cost.prefill_ms)
    return (fixed + cost.decode_per_sequence_ms * decodes + cost.prefill_per_token_ms * prefill_tokens) / 1e3


class WallClock:
    """Seconds of time.monotonic(); a step lasts what it took."""
    modelled = False

    def now(self) -> float:
        return time.monotonic()

    def step(self, decodes: int, prefill_tokens: int, measured: float) -> float:
        return measured

    def wait_until(self, t: float) -> None:
        time.sleep(max(0.0, t - time.monotonic()))


class ModelledClock:
    """A clock that moves only by modelled device time (and jumps to the next arrival when idle)."""
    modelled = True

    def __init__(self, cost: DeviceCost | None = None, start: float = 0.0):
        self.cost, self.t = cost or _device_cost(), float(start)

    def now(self) -> float:
        return self.t

    def step(self, decodes: int, prefill_tokens: int, measured: float) -> float:
        seconds = step_seconds(decodes, prefill_tokens, self.cost)
        self.t += seconds
        return seconds

    def wait_until(self, t: float) -> None:
        self.t = max(self.t, float(t))
