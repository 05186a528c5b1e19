"""Modelled accelerator time for serving demonstrations: what a forward pass would cost on a GPU.

Why: on the course's 2 shared CPU cores a decode step of the tiny Llama takes 3 ms on a quiet machine and
30 ms on a busy one, so measured latencies say more about the neighbours than about a batching policy or a
balancer. A served model's step time on its accelerator is stable and has a known shape: a decode step
reads every weight once whatever the batch (a fixed cost) plus a little per sequence; a prefill costs
about in proportion to its prompt tokens. `DeviceCost` is that shape, in milliseconds (chapter 3's
`DeviceTime` does the same for pipeline stages).

    cost = DeviceCost()                           # decode 8 ms + 0.25 ms/sequence, prefill 8 ms + 0.1 ms/token
    add_device_time(model, cost)                  # every forward also sleeps what it would cost (live servers)
    clock = VirtualClock()
    add_device_time(model, cost, clock)           # every forward advances `clock` instead (loadtest.replay)

`python -m helpers.course.serving --model helpers.course.serving.device_time` serves the tiny Llama (same tokens) whose
forwards sleep `DeviceCost()`: replicas then behave like accelerators, whatever else runs on the cores.

`ScheduleOnlyLM` has the tiny Llama's interface (logits, a KV cache that grows) and does no arithmetic:
the engine's schedule depends only on arrivals and lengths, never on token values, so a replay on a
virtual clock gives the same timestamps with it as with the real model (chapter 6 checks this), in a
fraction of the CPU time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

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


class VirtualClock:
    """Seconds on a clock that only moves when told to: the modelled device's, in a replay."""

    def __init__(self, now: float = 0.0):
        self.now = float(now)

    def advance(self, seconds: float) -> None:
        self.now += seconds


def add_device_time(model: torch.nn.Module, cost: DeviceCost | None = None, clock: VirtualClock | None = None):
    """After every forward of `model`, sleep its modelled device time, or advance `clock` by it.
    Returns the hook's handle (`.remove()` undoes it). The outputs are untouched."""
    cost = cost or DeviceCost()

    def hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise ValueError("add_device_time: the forward got no input_ids to cost")
        seconds = cost.seconds(*ids.shape)
        if clock is None:
            time.sleep(seconds)
        else:
            clock.advance(seconds)
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


class ScheduleOnlyLM(torch.nn.Module):
    """Shapes without arithmetic: logits of zeros (greedy picks token 0) and a one-layer KV cache of
    [batch, 1, length, 1] zeros that grows like the real model's. For replays whose result is a schedule."""

    def __init__(self, vocab_size: int = CONFIG.vocab_size):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, input_ids, past_key_values=None, use_cache=True, **_):
        batch, tokens = input_ids.shape
        cache = past_key_values if past_key_values is not None else DynamicCache()
        new = torch.zeros(batch, 1, tokens, 1)
        cache.update(new, new, 0)
        return CausalLMOutputWithPast(logits=torch.zeros(batch, tokens, self.vocab_size), past_key_values=cache)


def load_model(dtype=torch.float32):
    """The tiny Llama, whose every forward also sleeps DeviceCost() (the server's `--model` interface)."""
    model = _load_tiny_llama(dtype)
    add_device_time(model, DeviceCost())
    return model
