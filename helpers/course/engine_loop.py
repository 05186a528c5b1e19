"""A serving engine's step loop with a per-step token budget, on modelled device time (chapter 7).

Each step the engine asks a scheduler which requests run and with how many tokens, runs ONE forward over
all of them (decodes and prompt chunks in the same batch, as vLLM and SGLang do), and advances a virtual
clock by that forward's modelled device time. A request's life:

    waiting ──(prompt chunks, one or more steps)──> running, prefilling ──(last chunk: first token)──>
    running, decoding (one token per step) ──(max_tokens generated)──> finished

`Request` is the state a scheduler needs: prompt length, prompt tokens already computed (in the KV cache),
tokens generated so far (with the time each was emitted). The scheduler is exercise 7.4,
`schedule_step(running, waiting, token_budget, chunked)` in labs/chunked_prefill.py; the loop only applies
what it returns, after checking it (`ScheduleError` says what was wrong).

Step time. Chapter 6's `DeviceCost` (helpers/course/serving/device_time.py) prices a decode step at
decode_ms + decode_per_sequence_ms per sequence and a prefill at prefill_ms + prefill_per_token_ms per
token. A mixed step reads the weights once (the fixed cost, counted once) and pays for every decode and
every prompt token it computes (`step_seconds`). Attention's quadratic term is left out: at the tiny
Llama's sizes the weights dominate; the schedule is the subject here.

    workload = Workload()                                   # 8 long decodes; 2,048-token prompts arriving
    unchunked = run_workload(workload, token_budget=8192, chunked=False)
    chunked = run_workload(workload, token_budget=256, chunked=True)
    unchunked.summary()["itl_p99"], chunked.summary()["itl_p99"]     # seconds of modelled device time
    [s.tokens for s in chunked.steps]                        # tokens computed in each step

`compare_chunking()` runs both on the same workload (the notebook's and `python -m helpers.bench
chunked_prefill`'s figure). The disaggregated comparison (helpers/course/disaggregated.py) reuses `Workload`,
`step_seconds` and `LoopResult`, so the three ways are priced alike.

Recipes for the notebook (each a verdict the run computes):

    results = compare_chunking()                      # {"unchunked": LoopResult, "chunked": LoopResult}
    p99 = {k: percentile(r.itls(Workload().decoder_ids), 99) for k, r in results.items()}
    verdict(p99["chunked"] <= p99["unchunked"] / 2, f"ITL p99 chunked {p99['chunked'] * 1e3:.0f} ms ≤ half of ...")
    verdict(all(s.tokens <= 256 for s in results["chunked"].steps), "no step over the budget")
    plot_steps({r.label: r for r in results.values()}, Workload().decoder_ids)   # tokens per step; ITL over time
    run = run_with_model(prompts, 8, arrivals, token_budget=16)                  # real tokens, chunked prompts
    verdict(run.tokens == {i: tiny_llama.generate(model, p, 8) for i, p in enumerate(prompts)}, "same tokens")
"""
from __future__ import annotations

import math
import numbers
import random
from dataclasses import dataclass, field

from helpers.course.serving.device_time import DeviceCost, VirtualClock

__all__ = ["Request", "StepRecord", "LoopResult", "Workload", "ScheduleError", "step_seconds", "check_schedule",
           "apply_schedule", "run_workload", "run_with_model", "compare_chunking", "percentile", "plot_steps"]


@dataclass(eq=False)
class Request:
    """One request as the scheduler sees it. `computed`: prompt tokens whose K/V are in the cache;
    `token_times`: when each generated token was emitted (seconds on the virtual clock). The first token
    comes out of the step that computes the last prompt token; every later one out of a decode step."""
    rid: int
    prompt_len: int
    max_tokens: int
    arrival: float = 0.0
    computed: int = 0
    token_times: list = field(default_factory=list)

    def __post_init__(self):
        if self.prompt_len < 1 or self.max_tokens < 1:
            raise ValueError(f"request {self.rid}: prompt_len={self.prompt_len} and max_tokens={self.max_tokens} "
                             f"must be >= 1")

    @property
    def prefilled(self) -> bool:
        """True once the whole prompt is in the cache: from then on the request decodes."""
        return self.computed >= self.prompt_len

    @property
    def remaining_prompt(self) -> int:
        return self.prompt_len - self.computed

    @property
    def generated(self) -> int:
        return len(self.token_times)

    @property
    def done(self) -> bool:
        return self.generated >= self.max_tokens

    def __repr__(self):
        return (f"Request(rid={self.rid}, prompt {self.computed}/{self.prompt_len} computed, "
                f"{self.generated}/{self.max_tokens} generated)")


@dataclass(frozen=True)
class StepRecord:
    """One engine step: when it started, its modelled seconds, and what it computed.
    chunks: ((rid, prompt tokens), ...) of the prefill chunks; decodes: rids that decoded one token."""
    start: float
    seconds: float
    decodes: tuple
    chunks: tuple

    @property
    def prefill_tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    @property
    def tokens(self) -> int:
        return len(self.decodes) + self.prefill_tokens


class ScheduleError(ValueError):
    """A scheduler returned a step the engine cannot run (the message says which rule it broke)."""


def step_seconds(decodes: int, prefill_tokens: int, cost: DeviceCost | None = None) -> float:
    """Modelled device seconds of one forward computing `decodes` decode tokens (one per sequence) and
    `prefill_tokens` prompt tokens, priced with chapter 6's DeviceCost: the weights are read once per step
    (max of the two fixed costs), every decode and every prompt token adds its own cost.
    A decode-only step costs what DeviceCost.seconds(batch, 1) does; a prefill-only one DeviceCost.seconds(1, n)."""
    cost = cost or DeviceCost()
    if decodes < 0 or prefill_tokens < 0 or decodes + prefill_tokens == 0:
        raise ValueError(f"a step computes at least one token: decodes={decodes}, prefill_tokens={prefill_tokens}")
    if prefill_tokens == 0:
        fixed = cost.decode_ms
    elif decodes == 0:
        fixed = cost.prefill_ms
    else:
        fixed = max(cost.decode_ms, cost.prefill_ms)
    return (fixed + cost.decode_per_sequence_ms * decodes + cost.prefill_per_token_ms * prefill_tokens) / 1e3


def percentile(values, q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between the sorted values (numpy's default)."""
    values = sorted(values)
    if not values:
        return math.nan
    rank = (len(values) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


class LoopResult:
    """What a run produced: `requests` (each with its token_times) and `steps` (StepRecord, in order)."""

    def __init__(self, requests: list[Request], steps: list[StepRecord], label: str = ""):
        self.requests, self.steps, self.label = requests, steps, label

    def itls(self, rids=None) -> list[float]:
        """Every gap between two consecutive tokens of a request (of `rids`, default all), sorted."""
        chosen = [r for r in self.requests if rids is None or r.rid in rids]
        return sorted(b - a for r in chosen for a, b in zip(r.token_times, r.token_times[1:]))

    def ttfts(self, rids=None) -> list[float]:
        chosen = [r for r in self.requests if rids is None or r.rid in rids]
        return sorted(r.token_times[0] - r.arrival for r in chosen)

    def summary(self) -> dict:
        itl, ttft = self.itls(), self.ttfts()
        end = max(r.token_times[-1] for r in self.requests)
        tokens = sum(r.generated for r in self.requests)
        return {"steps": len(self.steps), "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
                "itl_max": max(itl), "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
                "makespan": end, "tok_per_s": tokens / end, "max_step_tokens": max(s.tokens for s in self.steps)}


@dataclass(frozen=True)
class Workload:
    """Running decodes while long prompts arrive. At t=0, `decoders` requests with short prompts start and
    generate `decoder_tokens` tokens each; `long_prompts` requests of `long_prompt` tokens (generating
    `long_tokens`) arrive as a Poisson process of `long_rate` per second from `first_long` on (seeded)."""
    decoders: int = 8
    decoder_prompt: int = 32
    decoder_tokens: int = 384
    long_prompts: int = 8
    long_prompt: int = 2048
    long_tokens: int = 16
    long_rate: float = 2.0
    first_long: float = 0.5
    seed: int = 0

    def requests(self) -> list[Request]:
        """Fresh requests (nothing computed), in arrival order; rids 0.. are the decoders, then the long ones."""
        out = [Request(i, self.decoder_prompt, self.decoder_tokens, 0.0) for i in range(self.decoders)]
        rng, t = random.Random(self.seed), self.first_long
        for j in range(self.long_prompts):
            out.append(Request(self.decoders + j, self.long_prompt, self.long_tokens, t))
            t += rng.expovariate(self.long_rate)
        return out

    @property
    def decoder_ids(self) -> set:
        return set(range(self.decoders))


def check_schedule(schedule, running: list[Request], waiting: list[Request], token_budget: int) -> list:
    """The engine's own check of one step ([(request, num_tokens), ...]) before it runs it: every entry a pair,
    each request running or waiting and there once, a decode 1 token, a chunk within the prompt's remaining
    tokens, the total within the budget. Returns the schedule as a list; raises ScheduleError."""
    entries = list(schedule)
    schedule, seen, total = [], set(), 0
    known = {id(r) for r in running} | {id(r) for r in waiting}
    for entry in entries:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], Request)):
            raise ScheduleError(f"a schedule entry must be (request, num_tokens), got {entry!r}")
        req, n = entry
        if isinstance(n, numbers.Integral) and not isinstance(n, bool):
            n = int(n)
        schedule.append((req, n))
        if id(req) not in known:
            raise ScheduleError(f"request {req.rid} is neither running nor waiting")
        if id(req) in seen:
            raise ScheduleError(f"request {req.rid} appears twice in one step")
        seen.add(id(req))
        if not isinstance(n, int) or n < 1:
            raise ScheduleError(f"request {req.rid}: num_tokens={n!r} must be an int >= 1")
        if req.prefilled and n != 1:
            raise ScheduleError(f"request {req.rid} is decoding: it computes exactly 1 token per step, got {n}")
        if not req.prefilled and n > req.remaining_prompt:
            raise ScheduleError(f"request {req.rid}: a chunk of {n} tokens but only {req.remaining_prompt} of its "
                                f"prompt are left to compute")
        total += n
    if total > token_budget:
        raise ScheduleError(f"the step computes {total} tokens, over the budget of {token_budget}")
    return schedule


def apply_schedule(schedule, running: list[Request], waiting: list[Request], token_budget: int, now: float):
    """Check one step's `schedule` ([(request, num_tokens), ...]) and apply it at time `now` (the step's end):
    prompt chunks advance `computed`, a request whose prompt completes emits its first token, a decode emits
    one token; waiting requests that got a chunk join `running` (arrival order kept); finished ones leave.
    Returns (rids that decoded, ((rid, chunk tokens), ...)). Raises ScheduleError on a rule broken."""
    schedule = check_schedule(schedule, running, waiting, token_budget)
    seen = {id(req) for req, _ in schedule}
    decodes, chunks = [], []
    for req, n in schedule:
        if req.prefilled:
            decodes.append(req.rid)
            req.token_times.append(now)
        else:
            chunks.append((req.rid, n))
            req.computed += n
            if req.prefilled:
                req.token_times.append(now)
    joined = [r for r in waiting if id(r) in seen]
    waiting[:] = [r for r in waiting if id(r) not in seen]
    running.extend(joined)
    running[:] = sorted((r for r in running if not r.done), key=lambda r: (r.arrival, r.rid))
    return tuple(decodes), tuple(chunks)


def run_workload(workload: Workload | list, token_budget: int, chunked: bool = True, cost: DeviceCost | None = None,
                 schedule_step=None, label: str = "", run_step=None) -> LoopResult:
    """Serve `workload` (a Workload, or a list of fresh Requests) with one engine whose every step is
    `schedule_step(running, waiting, token_budget, chunked)` (default: load_impl("chunked_prefill")'s) on a
    virtual clock priced by `step_seconds`. Requests arriving during a step are seen at the next one.
    run_step(schedule), when given, is called with each checked step before it is applied (requests still in
    their state before the step): the model's forward goes there (`run_with_model`)."""
    if schedule_step is None:
        from helpers import load_impl
        schedule_step = load_impl("chunked_prefill").schedule_step
    pending = sorted(workload.requests() if isinstance(workload, Workload) else workload,
                     key=lambda r: (r.arrival, r.rid))
    requests = list(pending)
    pending.reverse()
    clock, running, waiting, steps = VirtualClock(), [], [], []
    while pending or running or waiting:
        while pending and pending[-1].arrival <= clock.now:
            waiting.append(pending.pop())
        if not running and not waiting:
            clock.now = pending[-1].arrival
            continue
        schedule = list(schedule_step(list(running), list(waiting), token_budget, chunked))
        if not schedule:
            raise ScheduleError(f"the scheduler scheduled nothing at t={clock.now:.3f} s with {len(running)} "
                                f"running and {len(waiting)} waiting requests: the engine would stop")
        schedule = check_schedule(schedule, running, waiting, token_budget)
        decoding = sum(1 for req, _ in schedule if req.prefilled)
        prompt = sum(n for req, n in schedule if not req.prefilled)
        start = clock.now
        seconds = step_seconds(decoding, prompt, cost)
        clock.advance(seconds)
        if run_step is not None:
            run_step(schedule)
        decodes, chunks = apply_schedule(schedule, running, waiting, token_budget, clock.now)
        steps.append(StepRecord(start, seconds, decodes, chunks))
    return LoopResult(requests, steps, label)


def run_with_model(prompts: list, max_tokens, arrivals: list | None = None, token_budget: int = 32,
                   chunked: bool = True, cost: DeviceCost | None = None, schedule_step=None, engine=None,
                   label: str = "") -> LoopResult:
    """`run_workload` with real tokens: the tiny Llama on a paged KV cache (helpers/course/paged_llama.py's
    PagedLlama, whose block manager and paged attention are exercises 7.1-7.2) computes every step the
    scheduler returns: a prompt chunk is `engine.prefill(rid, prompt[:computed + n], start=computed)` (the
    positions before it read back from the pool), the decodes of a step one batched `engine.decode`. Greedy.
    prompts: lists of token ids; max_tokens: an int or one per prompt; arrivals: seconds (default all 0).
    The time is still modelled (step_seconds); the result also has `.tokens` {rid: generated ids}, which
    chunking must not change (the same as helpers.course.tiny_llama.generate gives each prompt alone)."""
    from helpers.course.paged_llama import PagedLlama
    prompts = [[int(t) for t in p] for p in prompts]
    lengths = list(max_tokens) if isinstance(max_tokens, (list, tuple)) else [max_tokens] * len(prompts)
    arrivals = list(arrivals) if arrivals is not None else [0.0] * len(prompts)
    if not len(prompts) == len(lengths) == len(arrivals):
        raise ValueError(f"{len(prompts)} prompts, {len(lengths)} max_tokens and {len(arrivals)} arrivals differ")
    if engine is None:
        block_size = 16
        blocks = sum(-(-(len(p) + n) // block_size) for p, n in zip(prompts, lengths))
        engine = PagedLlama(num_blocks=blocks, block_size=block_size)
    requests = [Request(i, len(p), n, a) for i, (p, n, a) in enumerate(zip(prompts, lengths, arrivals))]
    tokens = {r.rid: [] for r in requests}

    def run_step(schedule):
        decoding = [req for req, _ in schedule if req.prefilled]
        for req, n in schedule:
            if req.prefilled:
                continue
            if req.computed == 0:
                engine.manager.allocate(req.rid, req.prompt_len)
            logits = engine.prefill(req.rid, prompts[req.rid][:req.computed + n], start=req.computed)
            if req.computed + n == req.prompt_len:
                tokens[req.rid].append(int(logits[-1].argmax()))
        if decoding:
            logits = engine.decode([r.rid for r in decoding], [tokens[r.rid][-1] for r in decoding])
            for req, row in zip(decoding, logits):
                tokens[req.rid].append(int(row.argmax()))
        for req, _ in schedule:
            if len(tokens[req.rid]) >= req.max_tokens:
                engine.free(req.rid)

    result = run_workload(requests, token_budget, chunked, cost, schedule_step, label, run_step)
    result.tokens = tokens
    return result


def compare_chunking(workload: Workload | None = None, chunk_budget: int = 256, unchunked_budget: int = 8192,
                     cost: DeviceCost | None = None, schedule_step=None) -> dict:
    """The same workload served twice: whole prompts in one step (budget `unchunked_budget`, as an engine
    without chunked prefill needs at least the longest prompt) and chunked under `chunk_budget` tokens.
    Returns {"unchunked": LoopResult, "chunked": LoopResult}."""
    workload = workload or Workload()
    return {"unchunked": run_workload(workload, unchunked_budget, False, cost, schedule_step, "unchunked"),
            "chunked": run_workload(workload, chunk_budget, True, cost, schedule_step,
                                    f"chunked ({chunk_budget} tokens/step)")}


def plot_steps(results: dict, decoder_ids=None, window: tuple | None = None):
    """Two panels against modelled time: the tokens computed in each step (a step lasts as long as its line
    holds), and the inter-token latency of the requests `decoder_ids` (default all) at each token, p99 dotted.
    results: {label: LoopResult}; window: (start, end) seconds to show."""
    import matplotlib.pyplot as plt
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True, constrained_layout=True)
    colours = ["tab:red", "tab:blue", "tab:green", "tab:purple"]
    for (label, res), colour in zip(results.items(), colours):
        steps = res.steps
        top.step([s.start for s in steps] + [steps[-1].start + steps[-1].seconds],
                 [s.tokens for s in steps] + [steps[-1].tokens], where="post", color=colour, label=label, linewidth=1)
        gaps = sorted((b, (b - a) * 1e3) for r in res.requests if decoder_ids is None or r.rid in decoder_ids
                      for a, b in zip(r.token_times, r.token_times[1:]))
        p99 = percentile([g for _, g in gaps], 99)
        bottom.plot([t for t, _ in gaps], [g for _, g in gaps], ".", markersize=2, color=colour,
                    label=f"{label}: p99 {p99:.0f} ms")
        bottom.axhline(p99, color=colour, linestyle=":", linewidth=1)
    top.set_yscale("log")
    top.set_ylabel("tokens in the step")
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    bottom.set_yscale("log")
    bottom.set_xlabel("modelled time (s)")
    bottom.set_ylabel("inter-token latency (ms)")
    bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, markerscale=4)
    if window is not None:
        bottom.set_xlim(*window)
    return fig
