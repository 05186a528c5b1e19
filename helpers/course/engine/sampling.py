"""Choosing the next token from a request's logits: greedy, or temperature + nucleus (top_p) with the request's own
generator (so a seeded request gives the same tokens in any batch, on any replica, after any preemption)."""
from __future__ import annotations

import math

import torch

__all__ = ["sample"]


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    """Next token from logits [vocab]: greedy when temperature == 0, else temperature + nucleus (top_p).
    Temperatures below SAMPLING_EPS are greedy and others at least MIN_TEMPERATURE (protocol.py), so the
    division cannot overflow; NaN logits raise ValueError (greedy too) instead of a multinomial error."""
    if not math.isfinite(temperature) or not math.isfinite(top_p):
        raise ValueError(f"temperature={temperature} and top_p={top_p} must be finite")
    if bool(torch.isnan(logits).any()):  # argmax would quietly pick a NaN: answer an error, not garbage
        raise ValueError("the model's logits hold NaN: no token to choose")
    from helpers.course.serving.protocol import MIN_TEMPERATURE, SAMPLING_EPS   # not at the top: serving
    # imports this package, so a top-level import made `import helpers.course.engine` circular
    if temperature < SAMPLING_EPS:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / max(temperature, MIN_TEMPERATURE), dim=-1)
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("the model's logits are not finite (NaN or inf): no distribution to sample from")
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > top_p  # keep the smallest head >= top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
