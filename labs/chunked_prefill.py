"""Chapter 7 — chunked prefill: one scheduler step that mixes prompt chunks with decodes under a token budget.

A decode computes one token per running sequence; a prefill computes a whole prompt. Run a 2,048-token
prompt in one forward and every running sequence waits for it: their next token comes a whole prefill
later (an inter-token latency spike). Chunked prefill (Sarathi-Serve; vLLM's `enable_chunked_prefill` and
`max_num_batched_tokens`) caps the tokens of a step: the decodes go first, one token each, and what is left
of the budget goes to prompt chunks, so a long prompt is split over several steps and no step is much
longer than a decode step.

The request state is helpers.course.engine_loop.Request: `prompt_len`, `computed` (prompt tokens already in
the KV cache), `prefilled` (computed == prompt_len: the request decodes), `remaining_prompt`. The engine
loop there (`run_workload`) calls `schedule_step` once per step and applies what it returns.

Exercise 7.4 is `schedule_step`.
"""
from __future__ import annotations

from helpers.course.engine_loop import Request


def schedule_step(running: list[Request], waiting: list[Request], token_budget: int,
                  chunked: bool = True) -> list[tuple[Request, int]]:
    """Exercise 7.4 — the requests one engine step computes, and how many tokens each.

    running: requests admitted in earlier steps, in arrival order; those whose prompt is complete
             (`req.prefilled`) are decoding, the others are partly prefilled (their prompt was chunked).
    waiting: requests that arrived and have not started, first come first served.
    Returns [(request, num_tokens), ...], every num_tokens >= 1, their sum <= token_budget:
      1. decodes first: every decoding request of `running`, in order, gets 1 token (as many as the budget
         holds);
      2. then prompts, first come first served: the partly prefilled requests of `running`, then `waiting`.
         chunked=True: each gets min(its remaining prompt, the budget left), until the budget is spent (a
         long prompt is split across steps; the next step goes on from `req.computed`).
         chunked=False: a prompt runs whole or not at all; stop at the first that does not fit (a later,
         shorter prompt may not overtake it: it would starve).
    A request decodes only once its whole prompt is computed. Modifies nothing (the engine applies the
    step). Raises ValueError when token_budget < 1, or when chunked=False and a prompt it reaches is longer
    than token_budget (it could never run).
    """
    raise NotImplementedError("Exercise 7.4: schedule_step is not written yet (labs/chunked_prefill.py)")
