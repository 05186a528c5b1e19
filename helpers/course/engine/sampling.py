"""Choosing the next token from a request's logits: greedy, or temperature + nucleus (top_p) with the request's own
generator (so a seeded request gives the same tokens in any batch, on any replica, after any preemption); and the
log-probabilities a request asks for (`logprobs`), as vLLM reports them by default.

vLLM's Sampler (vllm/v1/sample/sampler.py, `forward`) computes the logprobs it returns from the model's raw logits,
before temperature, top-p or penalties (`compute_logprobs`: `logits.log_softmax(dim=-1, dtype=torch.float32)`;
logprobs_mode="raw_logprobs", the default in vllm/config/model.py), then `gather_logprobs` takes the sampled token's
logprob and the top `logprobs` tokens (`torch.topk`). `token_logprobs` does the same for one request."""
from __future__ import annotations

import math

import torch

__all__ = ["sample", "token_logprobs"]


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


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> dict:
    """The chosen `token`'s logprob and the `k` most likely tokens, best first, under the model's raw distribution
    (log_softmax of the logits in float32, before temperature and top_p: vLLM's "raw_logprobs"):
    {"logprob": float, "top": [[token_id, logprob], ...]}. k = 0 gives the chosen token's logprob only (as vLLM's
    logprobs=0); k above the vocabulary gives all of it."""
    logprobs = logits.float().log_softmax(dim=-1)
    top_values, top_ids = torch.topk(logprobs, min(int(k), logprobs.numel()))
    return {"logprob": float(logprobs[token]), "top": [[int(i), float(v)] for i, v in zip(top_ids, top_values)]}
