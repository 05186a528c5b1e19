"""Chapter 7 — the scheduler step: one token budget shared by running requests and new ones (vLLM V1).

A decode computes one token per running request; a prefill computes a whole prompt. Run a 2,048-token prompt in
one forward and every running request waits for it: their next token comes a whole prefill later (an inter-token
latency spike). A per-step token budget (vLLM's `max_num_batched_tokens`) caps a step: a long prompt is split
over several steps (chunked prefill), and no step is much longer than the others.

vLLM V1 has no prefill or decode phase (`vllm/v1/core/sched/scheduler.py`, `schedule`): every request just has
`num_computed_tokens` and `num_tokens` (prompt + generated), and each step the scheduler gives requests tokens
so that the first catches up with the second. The running requests go first, in admission order — a decode gets
its 1 token, a partly computed prompt its next chunk — then waiting requests, first come first served, with what
is left. Memory is part of the step: a request is scheduled only if its blocks can be allocated, and when a
running request cannot get one, the newest running request is preempted.

Exercise 7.4 is `schedule_step`. The engine's scheduler (helpers/course/engine/scheduler.py) calls it every step
with its queues and its KV cache manager, and checks what comes back.
"""
from __future__ import annotations

from helpers.course.engine.request import RequestStatus
from helpers.course.engine.scheduler import StepPlan, preempt  # noqa: F401  (StepPlan: what the step returns)


def schedule_step(running: list, waiting, kv, config) -> StepPlan:
    """Exercise 7.4 — one step of vLLM V1's scheduler.

    running: Requests (helpers/course/engine/request.py) that hold blocks, in admission order. waiting: a deque of
    Requests, first come first served (new ones, and preempted ones at the head). A Request has `rid`,
    `num_tokens` (prompt + generated), `num_computed_tokens`, `num_new_tokens` (= num_tokens - num_computed_tokens),
    `status`. kv: the KV cache manager: `kv.get_computed_blocks(request) -> int` (tokens of a waiting request
    already in the cache: its prefix-cache hits), `kv.allocate_slots(request, num_new_tokens,
    num_new_computed_tokens=0, num_lookahead_tokens=0, full_sequence_must_fit=False) -> bool` (False: does not fit,
    nothing changed). config: a SchedulerConfig (max_num_batched_tokens, max_num_seqs, long_prefill_token_threshold,
    enable_chunked_prefill, full_sequence_must_fit, num_lookahead_tokens).

    budget = config.max_num_batched_tokens. A request's share is n = its num_new_tokens (a waiting request's
    counted after its hits), capped at long_prefill_token_threshold when that is > 0, then at the budget left.
      1. RUNNING, in order, while budget is left: allocate_slots(request, n, num_lookahead_tokens=...); while that
         fails, preempt the NEWEST running request — running.pop(), `preempt(victim, kv)` (given: frees its
         blocks, resets its computed tokens, marks it), waiting.appendleft(victim), and if the victim had been
         scheduled earlier in this step, take its tokens back into the budget — and try again; if the victim is
         the request itself, stop scheduling running requests. Scheduled: the budget loses n.
      2. WAITING, only if nothing was preempted in this step, while budget is left and len(running) <
         max_num_seqs: take the head; hits = kv.get_computed_blocks(request); n as above (without chunked
         prefill, a request whose n does not fit the budget left stops admissions); allocate_slots(request, n,
         num_new_computed_tokens=hits, full_sequence_must_fit=config.full_sequence_must_fit): if it fails, stop
         admitting (the head stays at the head: no later request overtakes it); else pop it, set its
         num_computed_tokens = hits and status RUNNING, append it to running; the budget loses n.
    Returns StepPlan. Do not advance num_computed_tokens of scheduled requests: the engine does that once the
    step has run.
    """
    raise NotImplementedError("Exercise 7.4: schedule_step is not written yet (labs/chunked_prefill.py)")
