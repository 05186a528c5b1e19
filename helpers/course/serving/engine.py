"""One replica's engine: a queue of requests and a batch of running sequences, advanced one decode step
at a time. The three batching policies the chapter compares differ only in *when* a request may join:

    none        one sequence at a time (max_batch = 1)
    static      a batch is formed from the queue, and nothing joins until every sequence in it is done
    continuous  after every decode step, finished sequences leave and waiting ones join (vLLM, TGI, ...)

A decode step runs the model once on a [batch, 1] tensor of the batch's last tokens. Sequences in a batch
have different lengths, so their KV caches are left-padded to the longest and the padding is masked out
(`attention_mask`), with each sequence's own `position_ids`. A new sequence is prefilled on its own (its
whole prompt in one forward) and then joins the decode batch. vLLM does the same bookkeeping with a paged
KV cache instead of padding; the schedule is the point here, not the memory layout.

    engine = Engine(model, max_batch=8, batching="continuous")
    engine.submit(Sequence(rid=0, prompt=[72, 105], max_tokens=16))
    while engine.has_work:
        for seq in engine.step():          # the sequences that finished in this step
            print(seq.rid, seq.tokens)
        for seq in engine.take_failed():   # sequences that raised (seq.error says why): only they stop
            print(seq.rid, seq.error)

One request's failure is that request's alone: an exception while prefilling or sampling a sequence, or
a batched decode step that raises (then each sequence is retried alone to find the culprit), fails that
sequence and the others carry on. A server answers a failed sequence with an error; the replica lives.
"""
from __future__ import annotations

import math
import random
import time
import traceback
from collections import deque

import torch
from transformers import DynamicCache

from helpers.course.serving.protocol import MIN_TEMPERATURE, SAMPLING_EPS

BATCHING = ("none", "static", "continuous")


class Sequence:
    """One request being served. `cache` holds its KV cache: per layer a (keys, values) pair, each
    [1, kv_heads, length, head_dim], where length = prompt + generated tokens - 1 (the last generated token
    is the next step's input and not yet in the cache)."""

    def __init__(self, rid, prompt: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None):
        if not prompt:
            raise ValueError("a sequence needs at least one prompt token")
        self.rid, self.prompt, self.max_tokens = rid, list(prompt), int(max_tokens)
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.generator = None
        if self.temperature > 0:
            # A per-request generator: the same seed gives the same tokens on any replica, in any batch,
            # which is what makes retrying a request on another replica safe.
            self.generator = torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))
        self.tokens: list[int] = []
        self.cache = None
        self.error = self.traceback = None   # set when this sequence failed (Engine.take_failed)
        self.submitted = time.monotonic()
        self.started = self.first_token = self.finished = None

    @property
    def done(self) -> bool:
        return len(self.tokens) >= self.max_tokens

    @property
    def cache_length(self) -> int:
        return len(self.prompt) + len(self.tokens) - 1

    def timings(self) -> dict:
        """Seconds spent queued, to the first token, and in all, measured inside the replica."""
        return {"queued": self.started - self.submitted, "first_token": self.first_token - self.submitted,
                "total": self.finished - self.submitted}


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    """Next token from logits [vocab]: greedy when temperature == 0, else temperature + nucleus (top_p).
    Temperatures below SAMPLING_EPS are greedy and others at least MIN_TEMPERATURE (protocol.py), so the
    division cannot overflow; NaN logits raise ValueError (greedy too) instead of a multinomial error."""
    if not math.isfinite(temperature) or not math.isfinite(top_p):
        raise ValueError(f"temperature={temperature} and top_p={top_p} must be finite")
    if bool(torch.isnan(logits).any()):  # argmax would quietly pick a NaN: answer an error, not garbage
        raise ValueError("the model's logits hold NaN: no token to choose")
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


class Engine:
    """Batches decode steps of the sequences submitted to one replica. Not thread-safe: one loop drives it."""

    def __init__(self, model, max_batch: int = 8, batching: str = "continuous"):
        if batching not in BATCHING:
            raise ValueError(f"batching={batching!r}: choose one of {', '.join(BATCHING)}")
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be at least 1")
        self.model, self.batching = model, batching
        self.max_batch = 1 if batching == "none" else max_batch
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.failed: list[Sequence] = []   # failed since the last take_failed()
        self.busy_seconds = 0.0   # time spent computing (prefill + decode): the replica's utilisation
        self.steps = 0
        self.tokens_generated = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def submit(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def take_failed(self) -> list[Sequence]:
        """The sequences that failed since the last call (each with .error and .traceback), forgotten here."""
        failed, self.failed = self.failed, []
        return failed

    def fail(self, seq: Sequence, error: BaseException) -> None:
        """Take `seq` out of the engine as failed; the rest of the batch is untouched."""
        seq.error, seq.traceback = f"{type(error).__name__}: {error}", traceback.format_exc()
        seq.finished, seq.cache = time.monotonic(), None
        for queue in (self.waiting, self.running):
            if seq in queue:
                queue.remove(seq)
        self.failed.append(seq)

    def kv_stats(self) -> dict:
        """The KV cache's figures the server exports (paged_engine.py has them; a contiguous cache, none)."""
        return {}

    def cancel(self, rid) -> bool:
        """Drop a request (its client went away). True if it was queued or running here."""
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.rid == rid:
                    queue.remove(seq)
                    return True
        return False

    @torch.no_grad()
    def step(self) -> list[Sequence]:
        """Admit what the policy allows, run one decode step for the batch, return finished sequences."""
        start = time.perf_counter()
        self._admit()
        active = [s for s in self.running if not s.done]
        if active:
            self._decode(active)
            self.steps += 1
        now = time.monotonic()
        if self.batching == "static" and any(not s.done for s in self.running):
            finished = []  # a static batch is answered together, when its longest member is done
        else:
            finished = [s for s in self.running if s.done]
        for seq in finished:
            seq.finished, seq.cache = now, None
        self.running = [s for s in self.running if s not in finished]
        self.busy_seconds += time.perf_counter() - start
        return finished

    def _admit(self) -> None:
        if self.batching == "static" and self.running:
            return
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting.popleft()
            seq.started = time.monotonic()
            try:
                self._prefill(seq)
            except Exception as e:  # this request's failure, not the replica's
                self.fail(seq, e)
                continue
            self.running.append(seq)

    def _prefill(self, seq: Sequence) -> None:
        out = self.model(input_ids=torch.tensor([seq.prompt]), use_cache=True)
        seq.cache = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self._append(seq, out.logits[0, -1])
        seq.first_token = time.monotonic()

    def _decode(self, seqs: list[Sequence]) -> None:
        try:
            self._decode_batch(seqs)
        except Exception as e:
            if len(seqs) == 1:
                self.fail(seqs[0], e)
                return
            for seq in seqs:  # find the sequence that breaks the batch: each alone, the culprit fails
                try:
                    self._decode_batch([seq])
                except Exception as e:
                    self.fail(seq, e)

    def _decode_batch(self, seqs: list[Sequence]) -> None:
        lengths = [s.cache_length for s in seqs]
        longest = max(lengths)
        layers = []
        for layer in range(len(seqs[0].cache)):
            keys, values = [], []
            for s, n in zip(seqs, lengths):
                k, v = s.cache[layer]
                pad = longest - n  # left padding: every sequence's newest entry lines up at the right
                keys.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
                values.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
            layers.append((torch.cat(keys), torch.cat(values)))
        mask = torch.zeros(len(seqs), longest + 1, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, longest - n:] = 1
        out = self.model(input_ids=torch.tensor([[s.tokens[-1]] for s in seqs]),
                         position_ids=torch.tensor([[n] for n in lengths]),
                         attention_mask=mask, past_key_values=DynamicCache(layers), use_cache=True)
        new = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        for i, (s, n) in enumerate(zip(seqs, lengths)):
            s.cache = [(k[i:i + 1, :, longest - n:], v[i:i + 1, :, longest - n:]) for k, v in new]
            try:
                self._append(s, out.logits[i, -1])
            except Exception as e:  # sampling failed for this sequence only
                if len(seqs) == 1:
                    raise
                self.fail(s, e)

    def _append(self, seq: Sequence, logits: torch.Tensor) -> None:
        seq.tokens.append(sample(logits, seq.temperature, seq.top_p, seq.generator))
        self.tokens_generated += 1
