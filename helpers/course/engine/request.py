"""One request, from arrival to its last token: the only request type of the course's engine.

vLLM V1 keeps exactly this state per request (`vllm/v1/request.py`): the prompt's token ids, the tokens generated
so far, and `num_computed_tokens`, how many of all its tokens already have keys and values in the KV cache. The
scheduler has no "prefill phase" and no "decode phase": each step it gives a request
`num_tokens - num_computed_tokens` tokens to compute (or fewer, under the budget). For a request whose prompt is
not yet computed that is a prompt chunk; once it has caught up it is 1, the token it sampled last.

    req = Request(0, prompt=[72, 105], max_tokens=16, temperature=0.8, seed=1)
    req.num_tokens, req.num_computed_tokens, req.tokens      # 2, 0, []
"""
from __future__ import annotations

import enum
import random
import time

import torch

__all__ = ["Request", "RequestStatus"]


class RequestStatus(enum.Enum):
    WAITING = "waiting"          # queued, never scheduled
    RUNNING = "running"          # holds KV blocks, scheduled in steps
    PREEMPTED = "preempted"      # was running; its blocks were freed, it waits to be computed again
    FINISHED = "finished"        # max_tokens generated (or a stop token)
    FAILED = "failed"            # raised: its own failure, the engine goes on (request.error says why)
    ABORTED = "aborted"          # cancelled (its client went away)


class Request:
    """rid: any hashable id. prompt: token ids (at least one). max_tokens: tokens to generate (>= 1).
    temperature/top_p/seed: sampling (temperature 0: greedy); a seed gives a per-request generator, so the same
    request gives the same tokens on any replica, in any batch, after any preemption.
    arrival: when it arrived, on the engine's clock (a replay's virtual time, or time.monotonic()).
    cache_salt: mixed into its first block's hash (vLLM's `cache_salt`): only requests with the same salt share
    prefix-cache blocks.
    logprobs: None, or how many most likely tokens to record with each generated token (vLLM's
    SamplingParams.logprobs; 0: the chosen token's logprob only): output_logprobs then holds, per generated token,
    {"logprob": its logprob, "top": [[token_id, logprob], ...] best first} under the model's raw distribution
    (sampling.token_logprobs)."""

    def __init__(self, rid, prompt, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, arrival: float | None = None, cache_salt: str | None = None,
                 logprobs: int | None = None):
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError(f"request {rid!r}: a request needs at least one prompt token")
        if int(max_tokens) < 1:
            raise ValueError(f"request {rid!r}: max_tokens={max_tokens} must be >= 1")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
            raise ValueError(f"request {rid!r}: logprobs={logprobs!r} must be None or an integer >= 0")
        self.rid, self.prompt, self.max_tokens = rid, prompt, int(max_tokens)
        self.logprobs = logprobs
        self.temperature, self.top_p, self.seed, self.cache_salt = float(temperature), float(top_p), seed, cache_salt
        self.generator = None
        if self.temperature > 0:
            self.generator = torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))
        self.tokens: list[int] = []               # generated so far
        self.spec_token_ids: list[int] = []       # a proposer's draft tokens, to verify next step (chapter 10)
        self.output_logprobs: list[dict] = []     # one per generated token when logprobs is not None
        self.num_computed_tokens = 0              # of prompt + tokens, in the KV cache
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0
        self.num_cached_tokens = -1               # prefix-cache hits when first scheduled (vLLM's field)
        self.block_hashes: list = []              # one per full block of prompt + tokens (prefix caching)
        self._hashed_for = None                   # what block_hashes were computed for (block_hashes_upto)
        self.arrival = time.monotonic() if arrival is None else float(arrival)
        self.token_times: list[float] = []        # when each generated token came out (the engine's clock)
        self.started = self.finished = None       # first scheduled / finished, on the engine's clock
        self.error = self.traceback = None

    # ------------------------------------------------------------------ what the scheduler reads
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def num_tokens(self) -> int:
        """Prompt + generated tokens: what the KV cache will hold once this request has caught up."""
        return len(self.prompt) + len(self.tokens)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt + self.tokens

    @property
    def num_tokens_with_spec(self) -> int:
        """num_tokens and the draft tokens waiting to be verified (vLLM's name): what the scheduler catches up to."""
        return self.num_tokens + len(self.spec_token_ids)

    @property
    def num_new_tokens(self) -> int:
        """Tokens to compute before the next sample: a prompt (chunk) or, once caught up, 1 (1 + its draft tokens
        when a proposer gave it some: vLLM's num_tokens_with_spec - num_computed_tokens)."""
        return self.num_tokens_with_spec - self.num_computed_tokens

    @property
    def done(self) -> bool:
        return len(self.tokens) >= self.max_tokens

    def block_hashes_upto(self, num_tokens: int, block_size: int, hasher) -> list:
        """`block_hashes`, covering at least the full blocks of the first num_tokens tokens: the blocks not hashed
        yet are hashed by `hasher` (exercise 7.3's block_hashes(token_ids, block_size, parent, cache_salt)),
        continuing the chain from the last hash, so each block of a request is hashed once, not at every step it
        waits or every time a lookup or an event needs it. vLLM keeps the same list on its Request
        (`vllm/v1/request.py`: `block_hashes`, extended by `update_block_hashes` when the request is made and
        as output tokens are appended, with the hasher of `vllm/v1/core/kv_cache_utils.py`
        `get_request_block_hasher`, which hashes only the new full blocks). Tokens are only ever appended, so
        the hashes already computed stay right; they are computed again from the start when the block size,
        the hasher, the cache salt or the prompt or tokens list itself (a new list assigned) is not the one they
        were computed for. The list returned is `block_hashes` itself (callers read it, never change it)."""
        key = (block_size, hasher, self.cache_salt)
        known = self.block_hashes
        if self._hashed_for is None or self._hashed_for[0] != key or self._hashed_for[1] is not self.prompt \
                or self._hashed_for[2] is not self.tokens:
            known = self.block_hashes = []
            self._hashed_for = (key, self.prompt, self.tokens)
        full = min(num_tokens, self.num_tokens) // block_size
        if len(known) < full:
            start = len(known) * block_size
            known.extend(hasher(self.all_token_ids[start:full * block_size], block_size,
                                parent=known[-1] if known else None, cache_salt=self.cache_salt))
        return known

    # ------------------------------------------------------------------ what drivers read
    @property
    def first_token(self):
        return self.token_times[0] if self.token_times else None

    def timings(self) -> dict:
        """Seconds spent queued, to the first token, and in all, on the engine's clock."""
        return {"queued": self.started - self.arrival, "first_token": self.first_token - self.arrival,
                "total": self.finished - self.arrival}

    def itls(self) -> list[float]:
        """Gaps between consecutive generated tokens."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    def __repr__(self):
        return (f"Request({self.rid!r}, {self.num_computed_tokens}/{self.num_tokens} computed, "
                f"{len(self.tokens)}/{self.max_tokens} generated, {self.status.value})")
