"""Wrong answers to exercise 7.4 (one step of vLLM V1's scheduler), planted in the reference solution, for
tests/graders/test_ch07_chunked_prefill.py::test_planted_mistakes_are_caught; and valid answers written
differently, which the graders must pass (test_valid_alternatives_pass).

Each variant is a mistake a learner makes: most give plausible runs (every request served in the end, the
engine's own checks passed), so only a grader that compares who gets how many tokens of which step, who is
preempted and who is admitted catches them. `build(name)` returns an object whose `.chunked_prefill` the graders'
checks accept in place of load_impl("chunked_prefill").
"""
from __future__ import annotations

import types
from dataclasses import dataclass

from helpers.course.engine.request import RequestStatus
from helpers.course.engine.scheduler import preempt


@dataclass(frozen=True)
class Variant:
    what: str
    points_at: tuple    # the first failure message must contain one of these


VARIANTS = {
    "decode_first": Variant("running decodes scheduled before partial prefills (Sarathi / vLLM V0)",
                            ("admission order",)),
    "threshold_ignored": Variant("long_prefill_token_threshold ignored", ("long_prefill_token_threshold",)),
    "budget_exceeded": Variant("a running request's share not capped by the budget left",
                               ("max_num_batched_tokens",)),
    "admits_after_preemption": Variant("waiting requests admitted in a step that preempted",
                                       ("admitted in a step that preempted",)),
    "oldest_preempted": Variant("the oldest running request preempted", ("NEWEST",)),
    "overtakes_blocked_head": Variant("a later waiting request admitted past a head that does not fit",
                                      ("head-of-line",)),
    "ignores_hits": Variant("prefix-cache hits never asked for: cached tokens computed again",
                            ("get_computed_blocks",)),
    "max_num_seqs_ignored": Variant("admissions not capped by max_num_seqs", ("max_num_seqs",)),
    "advances_computed": Variant("num_computed_tokens advanced by the step", ("the engine advances",)),
    "preempted_to_tail": Variant("a preempted request appended to the tail of the waiting queue",
                                 ("HEAD of the waiting queue",)),
    "full_fit_ignored": Variant("full_sequence_must_fit ignored", ("full_sequence_must_fit",)),
    "chunked_ignored": Variant("enable_chunked_prefill=False ignored: prompts split anyway",
                               ("enable_chunked_prefill=False",)),
    "partial_not_continued": Variant("every running request gets one token: partial prefills never continued",
                                     ("partial prefills are continued",)),
    # issue 21 item 18: the last token of the budget
    "one_token_left": Variant("scheduling stops with one token of budget left (budget > 1)", ("1 token",)),
}

ALTERNATIVES = {
    "for_loop": "the running queue walked with a for loop over a copy and a flag, the waiting queue with a "
                "while-True loop; StepPlan built at the end",
}


def _step(mistake=None):
    """The reference schedule_step with one mistake switched on."""
    import solutions.chunked_prefill as sol

    def schedule_step(running, waiting, kv, config):
        plan, budget = sol.StepPlan(), config.max_num_batched_tokens
        threshold = 0 if mistake == "threshold_ignored" else config.long_prefill_token_threshold
        if mistake == "decode_first":
            running.sort(key=lambda r: r.num_computed_tokens < r.num_prompt_tokens)
        index = 0
        while index < len(running) and budget > (1 if mistake == "one_token_left" else 0):
            request = running[index]
            n = request.num_new_tokens
            if 0 < threshold < n:
                n = threshold
            if mistake == "partial_not_continued":
                n = 1
            if mistake != "budget_exceeded":
                n = min(n, budget)
            scheduled = True
            while not kv.allocate_slots(request, n, num_lookahead_tokens=config.num_lookahead_tokens):
                victim = running.pop(0) if mistake == "oldest_preempted" else running.pop()
                preempt(victim, kv)
                (waiting.append if mistake == "preempted_to_tail" else waiting.appendleft)(victim)
                plan.preempted.append(victim)
                if victim.rid in plan.num_scheduled_tokens:
                    budget += plan.num_scheduled_tokens.pop(victim.rid)
                if victim is request:
                    scheduled = False
                    break
                if mistake == "oldest_preempted":
                    index -= 1
            if not scheduled:
                break
            plan.num_scheduled_tokens[request.rid] = n
            budget -= n
            if mistake == "advances_computed":
                request.num_computed_tokens += n
            index += 1
        if plan.preempted and mistake != "admits_after_preemption":
            return plan
        skipped = []
        least = 1 if mistake == "one_token_left" else 0
        while waiting and budget > least and (len(running) < config.max_num_seqs or mistake == "max_num_seqs_ignored"):
            request = waiting[0]
            hits = 0 if mistake == "ignores_hits" else kv.get_computed_blocks(request)
            n = request.num_tokens - hits
            if 0 < threshold < n:
                n = threshold
            if not config.enable_chunked_prefill and n > budget and mistake != "chunked_ignored":
                break
            n = min(n, budget)
            fit = config.full_sequence_must_fit and mistake != "full_fit_ignored"
            if not kv.allocate_slots(request, n, num_new_computed_tokens=hits, full_sequence_must_fit=fit):
                if mistake == "overtakes_blocked_head":
                    skipped.append(waiting.popleft())
                    continue
                break
            waiting.popleft()
            request.num_computed_tokens = hits + (n if mistake == "advances_computed" else 0)
            request.status = RequestStatus.RUNNING
            running.append(request)
            plan.num_scheduled_tokens[request.rid] = n
            budget -= n
        waiting.extendleft(reversed(skipped))
        return plan

    return schedule_step


def _for_loop(running, waiting, kv, config):
    """A valid answer written differently."""
    import solutions.chunked_prefill as sol
    tokens, preempted, left = {}, [], config.max_num_batched_tokens
    cap = config.long_prefill_token_threshold or None
    stopped = False
    for request in list(running):
        if left <= 0 or stopped or request not in running:
            break
        n = min(request.num_new_tokens, cap or request.num_new_tokens, left)
        while True:
            if kv.allocate_slots(request, n, num_lookahead_tokens=config.num_lookahead_tokens):
                tokens[request.rid] = n
                left -= n
                break
            victim = running.pop()
            preempt(victim, kv)
            waiting.appendleft(victim)
            preempted.append(victim)
            left += tokens.pop(victim.rid, 0)
            if victim is request:
                stopped = True
                break
    while not preempted and waiting and left > 0 and len(running) < config.max_num_seqs:
        head = waiting[0]
        hits = kv.get_computed_blocks(head)
        n = min(head.num_tokens - hits, cap or head.num_tokens)
        if n > left and not config.enable_chunked_prefill:
            break
        n = min(n, left)
        if not kv.allocate_slots(head, n, num_new_computed_tokens=hits,
                                 full_sequence_must_fit=config.full_sequence_must_fit):
            break
        running.append(waiting.popleft())
        head.num_computed_tokens, head.status = hits, RequestStatus.RUNNING
        tokens[head.rid] = n
        left -= n
    return sol.StepPlan(tokens, preempted)


def build(name: str | None):
    """The reference implementation with variant `name` planted (None: unmodified)."""
    import solutions.chunked_prefill as sol
    cp = types.SimpleNamespace(**{k: v for k, v in vars(sol).items() if not k.startswith("__")})
    if name == "for_loop":
        cp.schedule_step = _for_loop
    elif name is not None:
        if name not in VARIANTS:
            raise KeyError(f"no planted variant {name!r}")
        cp.schedule_step = _step(name)
    return types.SimpleNamespace(chunked_prefill=cp)
