"""Modelled accelerator time for serving demonstrations: what a forward pass would cost on a GPU.

Why: on the course's 2 shared CPU cores a decode step of the tiny Llama takes 3 ms on a quiet machine and
30 ms on a busy one, so measured latencies say more about the neighbours than about a batching policy or a
balancer. A served model's step time on its accelerator is stable and has a known shape: a decode step
reads every weight once whatever the batch (a fixed cost) plus a little per sequence; a prefill costs
about in proportion to its prompt tokens. `DeviceCost` is that shape, in milliseconds (chapter 3's
`DeviceTime` does the same for pipeline stages).

    cost = DeviceCost()                           # decode 8 ms + 0.25 ms/sequence, prefill 8 ms + 0.1 ms/token
    add_device_time(model, cost)                  # every forward also sleeps what it would cost (live servers)

A replay (loadtest.replay, chapter 7's runs) does not sleep: the engine's ModelledClock
(helpers/course/engine/clock.py) prices each step with the same DeviceCost and advances instead.

`python -m helpers.course.serving --model helpers.course.serving.device_time` serves the tiny Llama (same tokens) whose
forwards sleep `DeviceCost()`: replicas then behave like accelerators, whatever else runs on the cores.

`ScheduleOnlyLM()` passed to a replay in place of a model means "no model": the engine's schedule depends
only on arrivals and lengths, never on token values, so the replay runs the engine with a runner that
computes nothing (helpers/course/engine/runner.py's ModelledRunner) and gives the same steps and timestamps
as with the real model (chapter 6 checks this), in a fraction of the CPU time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from helpers.course.tiny_llama import CONFIG, PROMPT, decode, encode  # noqa: F401  (the module spec's interface)
from helpers.course.tiny_llama import load_model as _load_tiny_llama


@dataclass(frozen=True)
class DeviceCost:
    """Milliseconds of device time of one forward: decode [batch, 1] and prefill [batch, tokens]."""
    decode_ms: float = 8.0
    decode_per_sequence_ms: float = 0.25
    prefill_ms: float = 8.0
    prefill_per_token_ms: float = 0.1

    def __post_init__(self):
        for name, v in vars(self).items():
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"DeviceCost.{name}={v!r} must be a number >= 0 (milliseconds)")

    def seconds(self, batch: int, tokens: int) -> float:
        """Device seconds of a forward over input ids [batch, tokens] (tokens == 1: a decode step)."""
        if tokens == 1:
            return (self.decode_ms + self.decode_per_sequence_ms * batch) / 1e3
        return (self.prefill_ms + self.prefill_per_token_ms * batch * tokens) / 1e3


def add_device_time(model: torch.nn.Module, cost: DeviceCost | None = None):
    """After every forward of `model`, sleep its modelled device time. Returns the hook's handle (`.remove()`
    undoes it). The outputs are untouched."""
    cost = cost or DeviceCost()

    def hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError("add_device_time: the forward got no input_ids to cost")
        time.sleep(cost.seconds(*ids.shape))
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


class ScheduleOnlyLM:
    """No model: a replay given one runs the engine's ModelledRunner (the schedule and the clock only)."""


def load_model(dtype=torch.float32):
    """The tiny Llama, whose every forward also sleeps DeviceCost() (the server's `--model` interface)."""
    model = _load_tiny_llama(dtype)
    add_device_time(model, DeviceCost())
    return model
