"""Chapter 7's step loop: the course's engine (helpers/course/engine) under a token budget, on modelled device time.

There is no loop here: every run below is `LLMEngine` (helpers/course/engine/engine.py) — schedule, run, sample
— replayed by `run_requests` with each request arriving on the engine's clock. What this module adds is the
chapter's workload, its two configurations and its picture:

    workload = Workload()                                   # 8 long decodes; 2,048-token prompts arriving
    results = compare_chunking(workload)                    # {"unchunked": EngineResult, "chunked": EngineResult}
    percentile(results["chunked"].itls(workload.decoder_ids), 99)     # seconds of modelled device time
    [s.tokens for s in results["chunked"].steps]                      # tokens computed in each step

Each step is exercise 7.4's `schedule_step` (labs/chunked_prefill.py), called by the engine's scheduler with
vLLM V1's rules: one token budget (`max_num_batched_tokens`) spent first on the running requests in admission
order, then on waiting ones. Unchunked (`UNCHUNKED`: enable_chunked_prefill=False, a budget of 8,192 tokens,
at least the longest prompt) a prompt is computed whole in one step, and every running decode waits for it;
chunked (`chunked_config(256)`) no step computes more than 256 tokens.

Step time. The engine's ModelledClock prices every step with `step_seconds` (helpers/course/engine/clock.py,
chapter 6's DeviceCost): the weights are read once per step and every decode and every prompt token adds its
cost, so a 2,048-token prefill makes a ~213 ms step and a step of 8 decodes 10 ms. Attention's quadratic term is
left out: at the tiny Llama's sizes the weights dominate; the schedule is the subject here.

`decode_first=True` adds the contrast of Sarathi-Serve and vLLM V0 (SchedulerConfig(policy="decode_first")):
the running decodes are scheduled before any prompt chunk. On this workload it changes little — the decoders
were admitted first, so V1's admission order already serves them first.

`run_with_model` is the same engine with real tokens: the tiny Llama on a paged KV cache (LLMEngine.paged:
exercises 7.1-7.2, prompt chunks and decodes of a step in ONE forward), still on modelled time; chunking must
not change the tokens. The disaggregated comparison (helpers/course/disaggregated.py) reuses `Workload`
and the same engine, so the three ways are priced alike.

Recipes for the notebook (each a verdict the run computes):

    results = compare_chunking()                      # {"unchunked": EngineResult, "chunked": EngineResult}
    p99 = {k: percentile(r.itls(Workload().decoder_ids), 99) for k, r in results.items()}
    verdict(p99["chunked"] <= p99["unchunked"] / 2, f"ITL p99 chunked {p99['chunked'] * 1e3:.0f} ms ≤ half of ...")
    verdict(all(s.tokens <= 256 for s in results["chunked"].steps), "no step over the budget")
    plot_steps({r.label: r for r in results.values()}, Workload().decoder_ids)   # tokens per step; ITL over time
    run = run_with_model(prompts, 8, arrivals, token_budget=16)                  # real tokens, chunked prompts
    verdict(run.tokens == {i: tiny_llama.generate(model, p, 8) for i, p in enumerate(prompts)}, "same tokens")
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from helpers.course.engine import EngineResult, LLMEngine, ModelledClock, Request, SchedulerConfig, StepRecord, \
    percentile, run_requests, step_seconds
from helpers.course.engine.stats import PERCENTILE_METHOD
from helpers.course.serving.device_time import DeviceCost

__all__ = ["Request", "StepRecord", "EngineResult", "Workload", "percentile", "PERCENTILE_METHOD", "step_seconds",
           "UNCHUNKED", "chunked_config", "run_workload", "run_with_model", "compare_chunking", "plot_steps"]

# An engine without chunked prefill computes a prompt whole in one step: its budget is at least the longest prompt.
UNCHUNKED = SchedulerConfig(max_num_batched_tokens=8192, enable_chunked_prefill=False)


def chunked_config(budget: int = 256, policy: str = "fcfs") -> SchedulerConfig:
    """Chunked prefill under a budget of `budget` tokens per step (vLLM V1; policy="decode_first": V0's order)."""
    return SchedulerConfig(max_num_batched_tokens=budget, enable_chunked_prefill=True, policy=policy)


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
        """Fresh engine Requests (nothing computed), in arrival order; rids 0.. are the decoders, then the long
        ones. A modelled request's prompt is token ids that no other request shares (consecutive integers), so a
        prefix cache, if the engine has one, never hits by accident."""
        out, next_id = [], 0

        def prompt(n):
            nonlocal next_id
            next_id += n
            return range(next_id - n, next_id)

        for i in range(self.decoders):
            out.append(Request(i, prompt(self.decoder_prompt), self.decoder_tokens, arrival=0.0))
        rng, t = random.Random(self.seed), self.first_long
        for j in range(self.long_prompts):
            out.append(Request(self.decoders + j, prompt(self.long_prompt), self.long_tokens, arrival=t))
            t += rng.expovariate(self.long_rate)
        return out

    @property
    def decoder_ids(self) -> set:
        return set(range(self.decoders))

    @property
    def long_ids(self) -> set:
        return set(range(self.decoders, self.decoders + self.long_prompts))


def _fresh(workload) -> list[Request]:
    """Requests to serve: a Workload's, or copies of the given ones (nothing computed), so a list can be reused."""
    if isinstance(workload, Workload):
        return workload.requests()
    return [Request(r.rid, r.prompt, r.max_tokens, r.temperature, r.top_p, r.seed, r.arrival, r.cache_salt)
            for r in workload]


def _check_budget(requests, config: SchedulerConfig) -> None:
    longest = max(r.num_prompt_tokens for r in requests)
    if not config.enable_chunked_prefill and longest > config.max_num_batched_tokens:
        raise ValueError(f"without chunked prefill a prompt is computed in one step: max_num_batched_tokens="
                         f"{config.max_num_batched_tokens} must be at least the longest prompt ({longest} tokens)")


def run_workload(workload: Workload | list, config: SchedulerConfig = UNCHUNKED, cost: DeviceCost | None = None,
                 schedule_step=None, label: str = "", kv=None) -> EngineResult:
    """Serve `workload` (a Workload, or a list of Requests: copies are served) on LLMEngine.modelled with
    `config`, on modelled device time priced by `cost` (chapter 6's DeviceCost). schedule_step: exercise 7.4's
    step (default load_impl's). kv: the KV side (default: unlimited memory, the schedule is the subject)."""
    requests = _fresh(workload)
    _check_budget(requests, config)
    engine = LLMEngine.modelled(kv, cost, config=config, schedule_step=schedule_step)
    return run_requests(engine, requests, label)


def compare_chunking(workload: Workload | None = None, chunk_budget: int = 256, unchunked_budget: int = 8192,
                     cost: DeviceCost | None = None, schedule_step=None, decode_first: bool = False) -> dict:
    """The same workload served twice: whole prompts in one step (enable_chunked_prefill=False, a budget of
    `unchunked_budget`) and chunked under `chunk_budget` tokens (vLLM V1's order). decode_first: also chunked
    with Sarathi's / vLLM V0's decode-first order. Returns {"unchunked": EngineResult, "chunked": EngineResult
    [, "decode first": EngineResult]}."""
    workload = workload or Workload()
    unchunked = SchedulerConfig(max_num_batched_tokens=unchunked_budget, enable_chunked_prefill=False)
    out = {"unchunked": run_workload(workload, unchunked, cost, schedule_step, "unchunked"),
           "chunked": run_workload(workload, chunked_config(chunk_budget), cost, schedule_step,
                                   f"chunked ({chunk_budget} tokens/step)")}
    if decode_first:
        out["decode first"] = run_workload(workload, chunked_config(chunk_budget, "decode_first"), cost, schedule_step,
                                           f"chunked, decode first (V0, {chunk_budget})")
    return out


def run_with_model(prompts: list, max_tokens, arrivals: list | None = None, token_budget: int = 32,
                   chunked: bool = True, cost: DeviceCost | None = None, schedule_step=None,
                   model=None, num_blocks: int | None = None, block_size: int = 16, label: str = "") -> EngineResult:
    """The chapter's engine with real tokens: LLMEngine.paged (the tiny Llama, or `model`, on a paged KV cache:
    exercises 7.1-7.2; every step's prompt chunks and decodes in one forward) under a budget of `token_budget`
    tokens per step, on modelled time (ModelledClock(cost)). Greedy. prompts: lists of token ids; max_tokens:
    an int or one per prompt; arrivals: seconds (default all 0); num_blocks: default enough for every sequence
    at full length. The result's `.tokens` {rid: generated ids} must not depend on chunking: the same as
    helpers.course.tiny_llama.generate gives each prompt alone."""
    prompts = [[int(t) for t in p] for p in prompts]
    lengths = list(max_tokens) if isinstance(max_tokens, (list, tuple)) else [max_tokens] * len(prompts)
    arrivals = list(arrivals) if arrivals is not None else [0.0] * len(prompts)
    if not len(prompts) == len(lengths) == len(arrivals):
        raise ValueError(f"{len(prompts)} prompts, {len(lengths)} max_tokens and {len(arrivals)} arrivals differ")
    if num_blocks is None:
        num_blocks = sum(-(-(len(p) + n) // block_size) for p, n in zip(prompts, lengths))
    requests = [Request(i, p, n, arrival=a) for i, (p, n, a) in enumerate(zip(prompts, lengths, arrivals))]
    config = SchedulerConfig(max_num_batched_tokens=token_budget, enable_chunked_prefill=chunked)
    _check_budget(requests, config)
    engine = LLMEngine.paged(model, num_blocks=num_blocks, block_size=block_size, config=config,
                             clock=ModelledClock(cost), schedule_step=schedule_step)
    return run_requests(engine, requests, label)


def plot_steps(results: dict, decoder_ids=None, window: tuple | None = None):
    """Two panels against modelled time: the tokens computed in each step (a step lasts as long as its line
    holds), and the inter-token latency of the requests `decoder_ids` (default all) at each token, p99 dotted
    (percentile by linear interpolation). results: {label: EngineResult}; window: (start, end) seconds to show."""
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
