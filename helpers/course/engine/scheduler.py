"""The engine's scheduler: which requests compute how many tokens this step, and who is preempted.

The rules are vLLM V1's (`vllm/v1/core/sched/scheduler.py`, `Scheduler.schedule` and `_preempt_request`); the
step itself is exercise 7.4, `schedule_step` in labs/chunked_prefill.py, which this class calls every step:

  * one token budget per step (`max_num_batched_tokens`), spent first on the RUNNING requests in admission
    order — decodes and partly computed prompts alike: each gets min(its tokens not yet computed,
    `long_prefill_token_threshold` if set and more than one request is running or waiting, the budget left) —
    then on WAITING requests first come first served, each after its prefix-cache hits, with whatever is left
    (even one token). There is no prefill phase and no decode phase: a request computes
    `num_tokens - num_computed_tokens` tokens until it has caught up, then 1.
  * `max_num_seqs` caps the running queue; an allocation failure at the head of the waiting queue stops
    admissions for the step; a request is admitted only if its whole current sequence fits
    (`full_sequence_must_fit`, counting its cached blocks).
  * when a running request cannot get its blocks, the NEWEST running request is preempted (possibly itself):
    its blocks are freed, its computed tokens reset to 0, its generated tokens kept, and it goes back to the
    head of the waiting queue; a step that preempted admits no one.

Speculative decoding (chapter 10) changes no rule: a request that a proposer gave k draft tokens
(`request.spec_token_ids`, set after the previous step) has `num_new_tokens` = 1 + k — its last sampled token and
the drafts — so the step charges the drafts to the token budget like any token and allocates their slots (vLLM:
`num_tokens_with_spec` in `schedule`). The schedule hands the drafts it scheduled to the engine
(`SchedulerOutput.spec_decode_tokens`, vLLM's `scheduled_spec_decode_tokens`; trimmed when the budget cut the
request short) and clears them from the request; a preempted request's drafts are dropped (`_preempt_request`).

`policy="decode_first"` is the contrast chapter 7 draws: Sarathi-Serve's and vLLM V0's chunked prefill, which
schedules the running decodes before any prompt chunk. The scheduler hands exercise 7.4 the running queue with
the decoding requests first (admission order otherwise); the step's rules are the same.

The KV side (`kv`, a KVCacheManager) is what the step calls: `get_computed_blocks`, `allocate_slots`; the
scheduler wraps it so a KV connector's tokens (kv_connector.py) count as computed, and records vLLM's prefix-
cache metric for every admission.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

from helpers.course.engine.request import Request, RequestStatus
from helpers.impl import load_impl

__all__ = ["SchedulerConfig", "SchedulerOutput", "Scheduler", "ScheduleError", "POLICIES", "StepPlan", "preempt",
           "continuous_batching_step"]

POLICIES = ("fcfs", "decode_first")


class ScheduleError(ValueError):
    """A step broke a rule the engine relies on (the message says which)."""


@dataclass(frozen=True)
class SchedulerConfig:
    """vLLM's scheduler options, by their names (`vllm serve --max-num-batched-tokens ...`)."""
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    long_prefill_token_threshold: int = 0          # 0: no cap per request
    enable_chunked_prefill: bool = True
    full_sequence_must_fit: bool = True            # vLLM's admission gate (scheduler_reserve_full_isl)
    num_lookahead_tokens: int = 0                  # slots past the scheduled tokens (vLLM: EAGLE's drafter KV)
    policy: str = "fcfs"

    def __post_init__(self):
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} and max_num_seqs="
                             f"{self.max_num_seqs} must be at least 1")
        if self.long_prefill_token_threshold < 0 or self.num_lookahead_tokens < 0:
            raise ValueError("long_prefill_token_threshold and num_lookahead_tokens must be >= 0")
        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r}: choose one of {', '.join(POLICIES)}")


@dataclass
class SchedulerOutput:
    """One step: num_scheduled_tokens {rid: tokens} in scheduling order (running first, then admitted);
    scheduled: the requests, in that order; admitted: those that joined the running queue this step (new or
    resumed after a preemption); preempted: those preempted this step (back in the waiting queue)."""
    num_scheduled_tokens: dict = field(default_factory=dict)
    scheduled: list = field(default_factory=list)
    admitted: list = field(default_factory=list)
    preempted: list = field(default_factory=list)
    external: dict = field(default_factory=dict)      # rid -> (start, count) a connector loads before the step
    spec_decode_tokens: dict = field(default_factory=dict)   # rid -> the draft tokens scheduled (verified after)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


@dataclass
class StepPlan:
    """What a step function returns: num_scheduled_tokens {rid: tokens} in the order scheduled; preempted: the
    requests preempted during the step, in order."""
    num_scheduled_tokens: dict = field(default_factory=dict)
    preempted: list = field(default_factory=list)


def continuous_batching_step(running: list, waiting, kv, config) -> StepPlan:
    """Chapter 6's step, for an engine whose memory is not the subject (a contiguous cache, a modelled replay):
    every running request computes what it has not yet computed (its whole prompt the step it is admitted, then
    one token per step), and waiting requests join first come first served while max_num_seqs allows — continuous
    batching. No budget cuts a prompt and no allocation fails, so nothing is preempted. Chapter 7's paged engine
    replaces this with exercise 7.4, vLLM V1's step with a token budget and a KV cache that can run out."""
    plan = StepPlan()
    for request in running:
        plan.num_scheduled_tokens[request.rid] = request.num_new_tokens
    while waiting and len(running) < config.max_num_seqs:
        request = waiting.popleft()
        request.status = RequestStatus.RUNNING
        running.append(request)
        plan.num_scheduled_tokens[request.rid] = request.num_new_tokens
    return plan


def preempt(request: Request, kv) -> None:
    """vLLM's _preempt_request: free its blocks, forget what was computed (its generated tokens stay), mark it.
    The caller has taken it out of the running queue and puts it at the head of the waiting queue."""
    kv.free(request)
    request.status = RequestStatus.PREEMPTED
    request.num_computed_tokens = 0
    request.num_preemptions += 1


class _ConnectorKV:
    """The KV manager as exercise 7.4 sees it: a connector's tokens count as computed at admission."""

    def __init__(self, kv, connector, output: SchedulerOutput):
        self.kv, self.connector, self.output, self.lookups = kv, connector, output, {}

    def get_computed_blocks(self, request) -> int:
        local = self.kv.get_computed_blocks(request)
        external = 0
        if self.connector is not None:
            external = max(0, min(int(self.connector.get_num_new_matched_tokens(request, local)),
                                  request.num_tokens - 1 - local))
        self.lookups[request.rid] = (local, external)
        return local + external

    def allocate_slots(self, request, num_new_tokens: int, num_new_computed_tokens: int = 0,
                       num_lookahead_tokens: int = 0, full_sequence_must_fit: bool = False) -> bool:
        local, external = num_new_computed_tokens, 0
        if num_new_computed_tokens and request.rid in self.lookups:
            local, external = self.lookups[request.rid]
            if local + external != num_new_computed_tokens:
                local, external = min(local, num_new_computed_tokens), 0
        ok = self.kv.allocate_slots(request, num_new_tokens, local, num_lookahead_tokens, full_sequence_must_fit,
                                    num_external_computed_tokens=external)
        if ok and external:
            self.output.external[request.rid] = (local, external)
        return ok

    def free(self, request) -> None:
        self.output.external.pop(request.rid, None)
        self.kv.free(request)


class Scheduler:
    """waiting (deque) and running (list, admission order) queues over a KVCacheManager `kv`."""

    def __init__(self, kv, config: SchedulerConfig | None = None, connector=None, schedule_step=None):
        self.kv, self.config, self.connector = kv, config or SchedulerConfig(), connector
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.schedule_step = schedule_step or load_impl("chunked_prefill").schedule_step
        self.num_preemptions = 0
        self._admitted_order: dict = {}
        self._counter = 0

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, admit: bool = True, skip=()) -> SchedulerOutput:
        """One step of exercise 7.4 over the queues, checked; admitted requests' prefix hits recorded.
        admit=False: no waiting request joins in this step (chapter 6's static batching).
        skip: rids of running requests this step must not schedule — a pipeline's requests whose previous step
        has not come back (vLLM's scheduler advances num_computed_tokens when it schedules, so such a request
        has 0 new tokens and `schedule` skips it with `continue`; `EngineCore.step_with_batch_queue` relies on it
        to keep a request in one batch in flight). The step function sees the running queue without them and a
        max_num_seqs less their number (they still hold their seats); they keep their place in the queue."""
        before, running, config = self.running, self.running, self.config
        if skip:
            running = [r for r in before if r.rid not in skip]
            if len(running) == len(before):
                running = before                         # the step appends its admissions to self.running
        hidden = len(before) - len(running)
        if hidden:
            room = config.max_num_seqs - hidden
            if room < 1 or (not running and not (admit and self.waiting)):
                return SchedulerOutput()                 # nothing to schedule this step
            config = replace(config, max_num_seqs=room)
        output = SchedulerOutput()
        kv = _ConnectorKV(self.kv, self.connector, output)
        if self.config.policy == "decode_first":
            running.sort(key=lambda r: (r.num_computed_tokens < r.num_prompt_tokens, self._admitted_order[r.rid]))
        waiting_before = {id(r) for r in self.waiting}
        waiting = self.waiting if admit else deque()
        # vLLM: alone, it starves no one. (vLLM counts a request in flight too, get_request_counts; the course
        # counts those shown, as its pipeline always did: a pipeline's schedules stay the ones recorded.)
        if config.long_prefill_token_threshold and len(running) + len(self.waiting) <= 1:
            config = replace(config, long_prefill_token_threshold=0)
        shown = set(map(id, running)) if hidden else None
        step = self.schedule_step(running, waiting, kv, config)
        if waiting is not self.waiting:                  # only preempted requests went there
            self.waiting.extendleft(reversed(waiting))
        if self.config.policy == "decode_first":
            running.sort(key=lambda r: self._admitted_order.get(r.rid, self._counter + 1))
        if hidden:                                       # the skipped ones keep their places; admitted ones last
            kept, old = set(map(id, running)), set(map(id, before))
            self.running = [r for r in before if id(r) not in shown or id(r) in kept] + \
                [r for r in running if id(r) not in old]
        output.num_scheduled_tokens = dict(step.num_scheduled_tokens)
        output.preempted = list(step.preempted)
        by_rid = {r.rid: r for r in running}
        output.scheduled = [by_rid[rid] for rid in output.num_scheduled_tokens if rid in by_rid]
        output.admitted = [r for r in running if id(r) in waiting_before]
        self._check(output, running, skip)
        self._take_drafts(output)
        for request in output.admitted:
            self._counter += 1
            self._admitted_order[request.rid] = self._counter
            local = kv.lookups.get(request.rid, (request.num_computed_tokens, 0))[0]
            self.kv.record_admission(request, local)     # vLLM: local hits only (a connector's tokens are not)
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = request.num_computed_tokens
        self.num_preemptions += len(output.preempted)
        return output

    @staticmethod
    def _take_drafts(output: SchedulerOutput) -> None:
        """vLLM's `schedule`: the scheduled share of each request's drafts goes to the step (num_new_tokens +
        num_computed_tokens - num_tokens of them), and the request's list is cleared (the proposer sets it again
        after the step); a preempted request's drafts are dropped."""
        for request in output.scheduled:
            drafts = getattr(request, "spec_token_ids", None)
            if not drafts:
                continue
            n = output.num_scheduled_tokens[request.rid] + request.num_computed_tokens - request.num_tokens
            if n > 0:
                output.spec_decode_tokens[request.rid] = list(drafts[:n])
            request.spec_token_ids = []
        for request in output.preempted:
            if getattr(request, "spec_token_ids", None):
                request.spec_token_ids = []

    def finish(self, request: Request, status: RequestStatus = RequestStatus.FINISHED) -> None:
        """Take a request out of the queues and give its blocks back."""
        if getattr(request, "spec_token_ids", None):
            request.spec_token_ids = []
        if request in self.running:
            self.running.remove(request)
        if request in self.waiting:
            self.waiting.remove(request)
        self._admitted_order.pop(request.rid, None)
        self.kv.free(request)
        request.status = status

    def _check(self, output: SchedulerOutput, shown: list, skip=()) -> None:
        """The rules the engine relies on, whatever the step function did (shown: the running queue it saw)."""
        config, where = self.config, "(labs/chunked_prefill.py: schedule_step)"
        total = output.total_num_scheduled_tokens
        if total > config.max_num_batched_tokens:
            raise ScheduleError(f"the step schedules {total} tokens, over max_num_batched_tokens="
                                f"{config.max_num_batched_tokens} {where}")
        if len(self.running) > config.max_num_seqs:
            raise ScheduleError(f"{len(self.running)} running requests, over max_num_seqs={config.max_num_seqs} "
                                f"{where}")
        running = {r.rid: r for r in shown}
        for rid, n in output.num_scheduled_tokens.items():
            request = running.get(rid)
            if request is None and rid in skip:
                raise ScheduleError(f"request {rid!r} is scheduled but its previous step has not come back {where}")
            if request is None:
                raise ScheduleError(f"request {rid!r} is scheduled but not in the running queue {where}")
            if not isinstance(n, int) or not 1 <= n <= request.num_new_tokens:
                raise ScheduleError(f"request {rid!r}: {n!r} tokens scheduled, it has {request.num_new_tokens} "
                                    f"to compute {where}")
