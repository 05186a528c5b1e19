"""Graders for chapter 7's scheduler step (labs/chunked_prefill.py): exercise 7.4, `schedule_step(running, waiting,
kv, config) -> StepPlan`, one step of vLLM V1's scheduler (`vllm/v1/core/sched/scheduler.py`, `schedule`).

The learner's `schedule_step` never runs in the grading process: every check runs inside a launched rank
(helpers.launch, one process), which also contains a scheduler that loops or crashes. Each check returns a list
of failures; tests/graders/planted_ch07_chunked_prefill.py plants wrong answers in the reference and
`test_planted_mistakes_are_caught` asserts each one is caught with a message naming the rule it breaks.

The grader has its own reference of V1's rules (`reference_step`, written apart from the reference answer) and
its own block manager (`GraderBlocks`, with and without prefix caching) under the engine's REAL KVCacheManager,
so that grading 7.4 does not depend on the learner's 7.1 or 7.3. What it compares, step by step, between the
learner's step and the reference on the same state: {rid: tokens} in scheduling order, the preempted requests,
the running and waiting queues after the step (admissions, a preempted request at the head of the waiting
queue), every request's num_computed_tokens, status and preemption count, and the KV blocks each holds:
  * one step, on hand-made states: a partly computed prompt before decodes (V1's order: running requests in
    admission order), long_prefill_token_threshold, a budget spent by the running requests or left to a waiting
    request (even one token), pools so small that the newest running request is preempted (or the needy
    request itself), prefix-cache hits, head-of-line blocking, max_num_seqs, full_sequence_must_fit on and off,
    enable_chunked_prefill=False, several prompts part-way through prefill, a preempted request re-admitted;
  * whole runs: random workloads (arrivals, shared system prompts, small pools that preempt, thresholds,
    max_num_seqs, chunked or not) through LLMEngine.modelled with run_requests, and one through the tiny Llama on
    a paged cache (LLMEngine with PagedRunner), whose greedy tokens must equal transformers'.
A difference is explained by the first rule it breaks (the message names it).

Mistakes caught (each planted in tests/graders/planted_ch07_chunked_prefill.py):
  decode_first            running decodes before partial prefills (Sarathi / vLLM V0), not admission order
  threshold_ignored       long_prefill_token_threshold ignored
  budget_exceeded         a running request's share not capped by the budget left
  admits_after_preemption waiting requests admitted in a step that preempted
  oldest_preempted        the oldest running request preempted instead of the newest
  overtakes_blocked_head  a later waiting request admitted when the head's allocation failed
  ignores_hits            prefix-cache hits never asked for: a waiting request computes its cached tokens
  max_num_seqs_ignored    more running requests than max_num_seqs
  advances_computed       num_computed_tokens advanced by the step (the engine does it after the step has run)
  preempted_to_tail       a preempted request appended to the tail of the waiting queue
  full_fit_ignored        full_sequence_must_fit ignored
  chunked_ignored         enable_chunked_prefill=False ignored: prompts split anyway
  partial_not_continued   every running request given one token: partial prefills never continued
  one_token_left          scheduling stops with one token of budget left (budget > 1), for running and waiting
A victim scheduled earlier in the step returning its tokens to the budget is part of the reference (vLLM keeps
it for priority scheduling), but with first-come-first-served order the victim is always the needy request or
one after it in `running`, never one scheduled before it: no state can tell an answer without it apart.
"""
from __future__ import annotations

import copy
import random
from collections import OrderedDict, deque

import pytest

from helpers import launch, load_impl
from helpers.course import tiny_llama  # noqa: F401  imported once here, so every forked rank has it (its
#                                       transformers Llama takes seconds to import on a busy machine)
from helpers.course.engine import KVCacheManager, LLMEngine, Request, RequestStatus, SchedulerConfig, run_requests
from helpers.course.kv_cache import OutOfBlocks
from tests.graders.planted import planted_tests

WHERE = "(labs/chunked_prefill.py: schedule_step)"


def _impl(impl):
    return impl.chunked_prefill if impl is not None else load_impl("chunked_prefill")


# ------------------------------------------------------------------------------- the grader's block manager

class GraderBlocks:
    """Blocks for the KVCacheManager, written plainly (exercise 7.1's contract, and 7.3's with caching=True), so
    that grading 7.4 does not depend on the learner's 7.1 / 7.3. A cached block's key is (salt, every token up to
    its end): the same identity as a chain of block hashes."""

    def __init__(self, num_blocks, block_size, caching=False):
        self.num_blocks, self.block_size, self.caching = num_blocks, block_size, caching
        self.free_blocks = deque(range(num_blocks))
        self.tables, self.num_tokens, self.ref_counts = {}, {}, {}
        self.cached, self.hash_of_block, self.evictable = {}, {}, OrderedDict()

    @property
    def num_free_blocks(self):
        return len(self.free_blocks) + len(self.evictable)

    def blocks_needed(self, num_tokens):
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id):
        return list(self.tables[seq_id])

    def seq_len(self, seq_id):
        return self.num_tokens[seq_id]

    def _key(self, ids, i, salt):
        return salt or None, tuple(ids[:(i + 1) * self.block_size])

    def cached_prefix(self, token_ids, cache_salt=None):
        ids, hits = list(token_ids), []
        for i in range((len(ids) - 1) // self.block_size):
            block = self.cached.get(self._key(ids, i, cache_salt))
            if block is None:
                break
            hits.append(block)
        return hits

    def _take(self):
        if self.free_blocks:
            return self.free_blocks.popleft()
        block, _ = self.evictable.popitem(last=False)
        del self.cached[self.hash_of_block.pop(block)]
        return block

    def allocate(self, seq_id, tokens, cache_salt=None):
        ids = list(tokens) if self.caching else None
        n = len(ids) if self.caching else int(tokens)
        hits = self.cached_prefix(ids, cache_salt) if self.caching else []
        needed = self.blocks_needed(n) - len(hits)
        if needed > len(self.free_blocks) + sum(1 for b in self.evictable if b not in hits):
            raise OutOfBlocks(f"{seq_id!r}: {needed} blocks needed")
        for block in hits:
            self.evictable.pop(block, None)
            self.ref_counts[block] = self.ref_counts.get(block, 0) + 1
        table = hits + [self._take() for _ in range(needed)]
        for block in table[len(hits):]:
            self.ref_counts[block] = 1
        self.tables[seq_id], self.num_tokens[seq_id] = table, n
        if not self.caching:
            return list(table)
        self.cache_blocks(seq_id, ids, cache_salt)
        return len(hits) * self.block_size

    def append_slot(self, seq_id):
        table, position = self.tables[seq_id], self.num_tokens[seq_id]
        if position == len(table) * self.block_size:
            if not self.num_free_blocks:
                raise OutOfBlocks("no free block")
            block = self._take()
            self.ref_counts[block] = 1
            table.append(block)
        self.num_tokens[seq_id] = position + 1
        return table[position // self.block_size], position % self.block_size

    def cache_blocks(self, seq_id, token_ids, cache_salt=None):
        ids, table, new = list(token_ids), self.tables[seq_id], []
        for i in range(min(len(ids) // self.block_size, len(table))):
            key = self._key(ids, i, cache_salt)
            if table[i] not in self.hash_of_block and key not in self.cached:
                self.cached[key], self.hash_of_block[table[i]] = table[i], key
                new.append(key)
        return new

    def free(self, seq_id):
        for block in reversed(self.tables.pop(seq_id)):
            self.ref_counts[block] -= 1
            if not self.ref_counts[block]:
                del self.ref_counts[block]
                (self.evictable.__setitem__(block, None) if block in self.hash_of_block
                 else self.free_blocks.append(block))
        del self.num_tokens[seq_id]


def _kv(num_blocks, block_size, caching=False):
    return KVCacheManager(num_blocks, block_size, caching, block_manager=GraderBlocks(num_blocks, block_size, caching))


# ------------------------------------------------------------------------------- the grader's reference

def _reference_preempt(request, kv):
    kv.free(request)
    request.status = RequestStatus.PREEMPTED
    request.num_computed_tokens = 0
    request.num_preemptions += 1


def reference_step(running, waiting, kv, config, looked_up=None):
    """vLLM V1's schedule() over the queues, written independently of the reference answer. Returns
    ({rid: tokens} in scheduling order, [preempted requests]); looked_up (a dict) gets each waiting request's
    prefix-cache hits as found when it reached the head (a running request's new blocks may evict cached ones)."""
    left, cap = config.max_num_batched_tokens, config.long_prefill_token_threshold
    tokens, preempted = {}, []

    def share(todo):
        return min(todo if cap <= 0 else min(todo, cap), left)

    position = 0
    while position < len(running) and left > 0:                     # 1. running, in admission order
        request = running[position]
        n = share(request.num_tokens - request.num_computed_tokens)
        fits = kv.allocate_slots(request, n, num_lookahead_tokens=config.num_lookahead_tokens)
        while not fits:
            victim = running.pop()                                  # the newest running request
            _reference_preempt(victim, kv)
            waiting.appendleft(victim)
            preempted.append(victim)
            left += tokens.pop(victim.rid, 0)
            if victim is request:
                break
            fits = kv.allocate_slots(request, n, num_lookahead_tokens=config.num_lookahead_tokens)
        if not fits:
            break
        tokens[request.rid] = n
        left -= n
        position += 1
    if preempted:                                                   # no admission in a step that preempted
        return tokens, preempted
    while waiting and left > 0 and len(running) < config.max_num_seqs:   # 2. waiting, first come first served
        request = waiting[0]
        hits = kv.get_computed_blocks(request)
        if looked_up is not None:
            looked_up[request.rid] = hits
        todo = request.num_tokens - hits
        if cap > 0:
            todo = min(todo, cap)
        if todo > left and not config.enable_chunked_prefill:
            break
        n = min(todo, left)
        if not kv.allocate_slots(request, n, num_new_computed_tokens=hits,
                                 full_sequence_must_fit=config.full_sequence_must_fit):
            break                                                   # head-of-line blocking
        waiting.popleft()
        request.num_computed_tokens, request.status = hits, RequestStatus.RUNNING
        running.append(request)
        tokens[request.rid] = n
        left -= n
    return tokens, preempted


# ------------------------------------------------------------------------------- comparing one step

class _Pre:
    """What the grader reads off a state before the step."""

    def __init__(self, running, waiting, kv, config):
        self.config = config
        self.running = [r.rid for r in running]
        self.waiting = [r.rid for r in waiting]
        everyone = list(running) + list(waiting)
        self.new = {r.rid: r.num_new_tokens for r in everyone}
        self.computed = {r.rid: r.num_computed_tokens for r in everyone}
        self.prompt = {r.rid: r.num_prompt_tokens for r in everyone}
        self.hits = {r.rid: kv.get_computed_blocks(r) for r in waiting}


def _block_manager(kv):
    return kv.block_manager if hasattr(kv, "block_manager") else kv.kv.block_manager


def _outcome(tokens, preempted, running, waiting, kv, everyone):
    manager = _block_manager(kv)
    return {"tokens": list(tokens.items()), "preempted": [r.rid for r in preempted],
            "running": [r.rid for r in running], "waiting": [r.rid for r in waiting],
            "computed": {r.rid: r.num_computed_tokens for r in everyone},
            "status": {r.rid: r.status for r in everyone},
            "preemptions": {r.rid: r.num_preemptions for r in everyone},
            "blocks": {rid: len(t) for rid, t in manager.tables.items()}, "free": manager.num_free_blocks}


def _read_plan(plan):
    """(tokens, preempted) of what schedule_step returned, or a message saying why it cannot be read."""
    tokens, preempted = getattr(plan, "num_scheduled_tokens", None), getattr(plan, "preempted", None)
    if not isinstance(tokens, dict) or not isinstance(preempted, list):
        return None, (f"returned {type(plan).__name__}, expected a StepPlan (num_scheduled_tokens: dict {{rid: "
                      f"tokens}}, preempted: list of requests) {WHERE}")
    for rid, n in tokens.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            return None, f"request {rid!r}: {n!r} tokens scheduled, expected an int >= 1 (leave out requests that " \
                         f"get none) {WHERE}"
    if not all(hasattr(r, "rid") for r in preempted):
        return None, f"StepPlan.preempted must hold the preempted Request objects {WHERE}"
    return (tokens, preempted), None


def diagnose(pre, got, want):
    """The first rule the learner's step breaks, as a message (None: the same as the reference)."""
    config = pre.config
    budget, cap = config.max_num_batched_tokens, config.long_prefill_token_threshold
    got_tokens, want_tokens = dict(got["tokens"]), dict(want["tokens"])
    known = set(pre.running) | set(pre.waiting)
    for rid in list(got_tokens) + got["preempted"]:
        if rid not in known:
            return f"request {rid!r} is neither running nor waiting before the step {WHERE}"
    for rid in got_tokens:
        if rid not in got["running"]:
            return (f"request {rid!r} is scheduled but not in `running` after the step: an admitted request is popped "
                    f"from waiting and appended to running (status RUNNING); a preempted one is not scheduled {WHERE}")
    if any(rid not in pre.running for rid in got["preempted"]):
        return f"preempted {got['preempted']}, but only running requests {pre.running} can be preempted {WHERE}"
    admitted = [rid for rid in got["running"] if rid in pre.waiting]
    resumed = [rid for rid in got["running"] if rid in got["preempted"]]      # preempted, then admitted again
    for rid in got["running"]:
        n = got_tokens.get(rid, 0)
        start = pre.hits[rid] if rid in pre.waiting else pre.computed[rid]
        if n and got["computed"][rid] == start + n != want["computed"][rid]:
            return (f"request {rid!r}: num_computed_tokens went from {start} to {start + n} in the step: leave it — "
                    f"the engine advances num_computed_tokens once the step has run {WHERE}")
    total = sum(got_tokens.values())
    if total > budget:
        return (f"the step schedules {total} tokens {got_tokens}, over max_num_batched_tokens={budget}: one budget "
                f"per step, every request's share capped at the budget left {WHERE}")
    if len(got["running"]) > config.max_num_seqs:
        return (f"{len(got['running'])} requests run after the step, over max_num_seqs={config.max_num_seqs}: admit "
                f"a waiting request only while len(running) < max_num_seqs {WHERE}")
    if got["preempted"] and admitted + resumed:
        return (f"request {(admitted + resumed)[0]!r} was admitted in a step that preempted {got['preempted']}: "
                f"no request is admitted in a step that preempted (the freed blocks go to the running requests "
                f"first) {WHERE}")
    if got["preempted"]:
        head = list(reversed(got["preempted"]))
        if got["waiting"][:len(head)] != head:
            return (f"after preempting {got['preempted']} the waiting queue is {got['waiting']}: a preempted request "
                    f"goes back to the HEAD of the waiting queue (waiting.appendleft), to be resumed first {WHERE}")
        if got["preempted"][0] != pre.running[-1]:
            return (f"preempted {got['preempted'][0]!r} first, but the newest running request is "
                    f"{pre.running[-1]!r} (running: {pre.running}): when a request cannot get its blocks, preempt the "
                    f"NEWEST running request, running.pop() — possibly the needy request itself {WHERE}")
    for rid, n in got_tokens.items():
        todo = pre.new[rid] - (pre.hits[rid] if rid in pre.waiting else 0)
        if cap > 0 and n > cap:
            return (f"request {rid!r} got {n} tokens, over long_prefill_token_threshold={cap}: a request's share is "
                    f"capped at the threshold when it is > 0 {WHERE}")
        if rid in pre.waiting and pre.hits[rid] and n > todo:
            return (f"request {rid!r} got {n} tokens, but {pre.hits[rid]} of its {pre.new[rid]} are in the prefix "
                    f"cache: ask kv.get_computed_blocks(request), compute only num_tokens - hits and pass the hits as "
                    f"num_new_computed_tokens {WHERE}")
        if n > todo:
            return f"request {rid!r} got {n} tokens but has only {todo} to compute {WHERE}"
        if rid in pre.waiting and not config.enable_chunked_prefill and n < min(todo, cap or todo):
            return (f"enable_chunked_prefill=False but request {rid!r} got {n} of its {todo} tokens: without chunked "
                    f"prefill a prompt runs whole in one step, or waits (and stops admissions) {WHERE}")
    order = [rid for rid in got_tokens if rid in pre.running]
    if order != sorted(order, key=pre.running.index):
        return (f"running requests were scheduled in the order {order}, not in admission order {pre.running}: V1 "
                f"schedules running requests in admission order, decodes and partial prefills alike (decodes first "
                f"is Sarathi's and vLLM V0's policy) {WHERE}")
    left = budget
    for i, rid in enumerate(pre.running):
        if rid in got["preempted"]:
            break
        share = min(pre.new[rid] if cap <= 0 else min(pre.new[rid], cap), left)
        n = got_tokens.get(rid, 0)
        later = [r for r in list(got_tokens) if r != rid and (r in pre.waiting or pre.running.index(r) > i)]
        if n < share and (later or total < budget):
            unused = budget - total
            why = f"while {later[0]!r} after it got some" if later else \
                f"with {unused} token{'s' if unused != 1 else ''} of the budget unused (schedule while budget > 0)"
            if pre.computed[rid] < pre.prompt[rid]:
                return (f"request {rid!r} is part-way through its prompt ({pre.computed[rid]}/{pre.prompt[rid]} "
                        f"computed) and got {n} tokens {why}: partial prefills are "
                        f"continued — a running request gets min(num_new_tokens, threshold, budget left) = {share} "
                        f"{WHERE}")
            return (f"running request {rid!r} got {n} tokens (its share: {share}) {why}: running requests are served "
                    f"in admission order, each its full share {WHERE}")
        left -= n
    want_admitted = [rid for rid in want["running"] if rid in pre.waiting]
    if admitted != pre.waiting[:len(admitted)]:
        return (f"admitted {admitted} from the waiting queue {pre.waiting}: first come first served with "
                f"head-of-line blocking — when the head cannot be allocated, admissions stop for the step; no later "
                f"request overtakes it {WHERE}")
    for rid in admitted:
        if pre.hits[rid] and got["computed"][rid] != pre.hits[rid]:
            return (f"admitted request {rid!r} has {pre.hits[rid]} prefix-cache hits but num_computed_tokens = "
                    f"{got['computed'][rid]}: set it to the hits, they are not computed again {WHERE}")
    if len(admitted) > len(want_admitted):
        extra = admitted[len(want_admitted)]
        if config.full_sequence_must_fit and got_tokens.get(extra, 0) < pre.new[extra] - pre.hits[extra]:
            return (f"request {extra!r} was admitted with {got_tokens.get(extra)} of its {pre.new[extra]} tokens, but "
                    f"its whole sequence does not fit the free blocks: pass full_sequence_must_fit="
                    f"config.full_sequence_must_fit to allocate_slots (vLLM admits a request only if all of it fits)"
                    f" {WHERE}")
        return (f"admitted {admitted}, expected only {want_admitted}: a waiting request is admitted while the budget "
                f"has room, len(running) < max_num_seqs and allocate_slots succeeds {WHERE}")
    if len(admitted) < len(want_admitted):
        missed = want_admitted[len(admitted)]
        hint = (" — full_sequence_must_fit=False: pass config.full_sequence_must_fit to allocate_slots"
                if not config.full_sequence_must_fit else "")
        unused = budget - sum(got_tokens.values())
        return (f"request {missed!r} was not admitted although it fits ({unused} token{'s' if unused != 1 else ''} "
                f"of the budget left, max_num_seqs, its blocks){hint}: admit waiting requests first come first "
                f"served while they fit (while budget > 0: one token left admits a chunk of one) {WHERE}")
    for key, what in (("tokens", "{rid: tokens} scheduled"), ("preempted", "preempted"), ("running", "running queue"),
                      ("waiting", "waiting queue"), ("computed", "num_computed_tokens"), ("status", "status"),
                      ("preemptions", "num_preemptions (call the given preempt(victim, kv))"),
                      ("blocks", "KV blocks held per request (call kv.allocate_slots(request, n, ...) as documented)"),
                      ("free", "free KV blocks")):
        if got[key] != want[key]:
            return f"{what}: got {got[key]}, expected {want[key]} {WHERE}"
    return None


def _compare(step, running, waiting, kv, config):
    """Run the learner's step on (running, waiting, kv) and the reference on a copy of the same state; returns
    (the learner's plan, a message or None)."""
    r2, w2, kv2 = copy.deepcopy((list(running), deque(waiting), kv))
    pre = _Pre(r2, w2, kv2, config)
    everyone2 = list(r2) + list(w2)
    looked_up = {}
    want = _outcome(*reference_step(r2, w2, kv2, config, looked_up), r2, w2, kv2, everyone2)
    pre.hits.update(looked_up)
    everyone = list(running) + list(waiting)
    try:
        plan = step(running, waiting, kv, config)
    except NotImplementedError:
        raise
    except Exception as exc:
        if "get_computed_blocks" in str(exc):
            return None, (f"allocate_slots found prefix-cache hits that the step did not pass: ask "
                          f"kv.get_computed_blocks(request) for a waiting request, compute only num_tokens - hits, "
                          f"and pass them as num_new_computed_tokens ({type(exc).__name__}: {exc}) {WHERE}")
        return None, f"raised {type(exc).__name__}: {exc} {WHERE}"
    read, problem = _read_plan(plan)
    if problem:
        return plan, problem
    return plan, diagnose(pre, _outcome(*read, running, waiting, kv, everyone), want)


# ---------------------------------------------------------------------------------- one step, many states

def _ids(rid, n, base=None):
    return list(base or []) + [1000 * (rid + 1) + i for i in range(n - len(base or []))]


SYSTEM = list(range(500, 516))          # 16 tokens: 4 blocks of 4


def _running(kv, rid, prompt, generated=0, computed=None):
    """A request admitted earlier: `computed` of its tokens (default all but the last) in its blocks."""
    request = Request(rid, prompt if isinstance(prompt, list) else _ids(rid, prompt), 64)
    request.tokens = [7] * generated
    computed = request.num_tokens - 1 if computed is None else computed
    hits = 0
    if kv.enable_caching:
        hits = len(kv.block_manager.cached_prefix(request.all_token_ids[:computed])) * kv.block_size
    assert kv.allocate_slots(request, computed - hits, num_new_computed_tokens=hits), f"state: {rid} does not fit"
    request.num_computed_tokens, request.status = computed, RequestStatus.RUNNING
    return request


def _waiting(rid, prompt, generated=0):
    request = Request(rid, prompt if isinstance(prompt, list) else _ids(rid, prompt), 64)
    if generated:                                   # preempted earlier: its generated tokens stay
        request.tokens, request.status, request.num_preemptions = [7] * generated, RequestStatus.PREEMPTED, 1
    return request


def _config(**options):
    return SchedulerConfig(**{"max_num_batched_tokens": 64, **options})


def step_cases():
    """(label, factory): factory() builds a fresh (running, waiting, kv, config)."""
    def case(blocks, caching, config, running, waiting):
        def build():
            kv = _kv(blocks, 4, caching)
            return [_running(kv, *spec) for spec in running], deque(_waiting(*spec) for spec in waiting), kv, config
        return build

    return [
        ("a partly computed prompt ahead of two decodes, budget 50",
         case(64, False, _config(max_num_batched_tokens=50), [(0, 100, 0, 40), (1, 10, 3), (2, 12, 2)], [(3, 30)])),
        ("two prompts part-way through prefill, then a decode, budget 48",
         case(64, False, _config(max_num_batched_tokens=48), [(0, 60, 0, 20), (1, 50, 0, 10), (2, 8, 4)], [(3, 9)])),
        ("long_prefill_token_threshold=16",
         case(64, False, _config(long_prefill_token_threshold=16), [(0, 100, 0, 20), (1, 10, 2)], [(2, 40), (3, 40)])),
        ("3 decodes and budget 4: the waiting prompt gets the one token left",
         case(64, False, _config(max_num_batched_tokens=4), [(0, 9, 1), (1, 9, 2), (2, 9, 3)], [(3, 50)])),
        ("3 decodes spend the budget of 3", case(64, False, _config(max_num_batched_tokens=3),
                                                 [(0, 9, 1), (1, 9, 2), (2, 9, 3)], [(3, 10)])),
        ("a full pool: the first decode needs a block, the newest is preempted (budget 3, "
         "full_sequence_must_fit=False)",
         case(7, False, _config(max_num_batched_tokens=3, full_sequence_must_fit=False),
              [(0, 8, 1), (1, 6, 1), (2, 12, 1)], [(3, 4)])),
        ("a full pool: the first decode needs a block, the newest is preempted",
         case(6, False, _config(), [(0, 8, 1), (1, 6, 1), (2, 8, 1)], [(3, 4)])),
        ("a full pool: the newest request needs a block and preempts itself",
         case(4, False, _config(), [(0, 6, 1), (1, 8, 1)], [(2, 2)])),
        ("prefix-cache hits of a waiting request on a running request's blocks",
         case(32, True, _config(), [(0, SYSTEM + _ids(0, 5), 1)], [(1, SYSTEM + _ids(1, 6)), (2, 10), (3, SYSTEM)])),
        ("a preempted request (5 tokens generated) comes back", case(32, True, _config(), [(0, 9, 2)], [(1, 10, 5)])),
        ("head-of-line blocking: the head does not fit, a small request behind it does",
         case(8, False, _config(), [(0, 19, 1)], [(1, 20), (2, 4)])),
        ("max_num_seqs=3 with 2 running", case(32, False, _config(max_num_seqs=3), [(0, 9, 1), (1, 9, 1)],
                                               [(2, 4), (3, 4), (4, 4)])),
        ("full_sequence_must_fit: a chunk of 8 fits, the whole 30 tokens do not",
         case(8, False, _config(max_num_batched_tokens=9), [(0, 19, 1)], [(1, 30)])),
        ("full_sequence_must_fit=False: the chunk is admitted",
         case(8, False, _config(max_num_batched_tokens=9, full_sequence_must_fit=False), [(0, 19, 1)], [(1, 30)])),
        ("enable_chunked_prefill=False: whole prompts while they fit",
         case(64, False, _config(max_num_batched_tokens=32, enable_chunked_prefill=False), [(0, 9, 1)],
              [(1, 30), (2, 10)])),
        ("enable_chunked_prefill=False: the head does not fit the budget",
         case(64, False, _config(max_num_batched_tokens=32, enable_chunked_prefill=False), [(0, 9, 1)],
              [(1, 40), (2, 5)])),
        ("a partly computed prompt takes all but 1 token of the budget of 61; the decode behind it gets that 1 token",
         case(64, False, _config(max_num_batched_tokens=61), [(0, 100, 0, 40), (1, 10, 3)], [(2, 30)])),
    ]


def check_step(impl):
    step, failures = _impl(impl).schedule_step, []
    for label, build in step_cases():
        running, waiting, kv, config = build()
        _, problem = _compare(step, running, waiting, kv, config)
        if problem:
            failures.append(f"[7.4] {label}: {problem}")
    return failures


# ------------------------------------------------------------------------------------- whole engine runs

class _Mismatch(Exception):
    pass


def _graded(step):
    """The learner's step inside the engine, each call compared with the reference on the same state."""
    count = [0]

    def checked(running, waiting, kv, config):
        count[0] += 1
        shown = f"{len(running)} running, {len(waiting)} waiting"
        plan, problem = _compare(step, running, waiting, kv, config)
        if problem:
            raise _Mismatch(f"step {count[0]} ({shown}): {problem}")
        return plan

    return checked


# each workload's options: max_num_batched_tokens (None: unchunked, the longest request + 8), max_num_seqs,
# long_prefill_token_threshold, full_sequence_must_fit, prefix caching, policy
ENGINE_OPTIONS = {7400: (16, 256, 0, True, True, "fcfs"), 7401: (32, 3, 8, True, False, "fcfs"),
                  7402: (48, 256, 12, False, True, "fcfs"), 7403: (None, 4, 0, True, False, "fcfs"),
                  7404: (24, 256, 0, True, True, "decode_first"), 7405: (20, 6, 16, False, False, "fcfs")}
WORKLOADS = tuple(ENGINE_OPTIONS)


def _workload(seed):
    """A random workload: (requests, kv, config). Arrivals over ~0.3 s of modelled time, prompts that share one
    of two system prompts, pools small enough to preempt."""
    rng = random.Random(seed)
    budget, seqs, threshold, fit, caching, policy = ENGINE_OPTIONS[seed]
    size = rng.choice((4, 8))
    systems = [_ids(90 + k, rng.randint(size, 5 * size)) for k in range(2)]
    requests, longest = [], 0
    for i in range(rng.randint(10, 14)):
        n = rng.randint(3, 70)
        prompt = (rng.choice(systems) + _ids(i, n)) if rng.random() < 0.5 else _ids(i, n)
        request = Request(i, prompt, rng.randint(1, 20), arrival=round(rng.uniform(0, 0.3), 3),
                          cache_salt="b" if rng.random() < 0.2 else None)
        requests.append(request)
        longest = max(longest, len(prompt) + request.max_tokens)
    blocks = -(-longest // size) + rng.randint(0, 8)
    config = SchedulerConfig(max_num_batched_tokens=budget or longest + 8, max_num_seqs=seqs,
                             long_prefill_token_threshold=threshold, enable_chunked_prefill=budget is not None,
                             full_sequence_must_fit=fit, policy=policy)
    return requests, _kv(blocks, size, caching), config


def check_engine(impl):
    step, failures = _impl(impl).schedule_step, []
    for seed in WORKLOADS:
        requests, kv, config = _workload(seed)
        label = (f"random workload {seed} ({len(requests)} requests, {kv.num_blocks} blocks of {kv.block_size}, "
                 f"prefix caching {'on' if kv.enable_caching else 'off'}, max_num_batched_tokens="
                 f"{config.max_num_batched_tokens}, threshold {config.long_prefill_token_threshold}, "
                 f"chunked={config.enable_chunked_prefill}, max_num_seqs={config.max_num_seqs})")
        engine = LLMEngine.modelled(kv, config=config, schedule_step=_graded(step))
        try:
            result = run_requests(engine, requests, max_steps=5000)
        except NotImplementedError:
            raise
        except _Mismatch as exc:
            failures.append(f"[7.4] engine run, {label}: {exc}")
            continue
        except Exception as exc:
            failures.append(f"[7.4] engine run, {label}: {type(exc).__name__}: {exc} {WHERE}")
            continue
        short = [r.rid for r in result.requests if len(r.tokens) != r.max_tokens]
        if short:
            failures.append(f"[7.4] engine run, {label}: requests {short} did not get all their tokens {WHERE}")
    return failures


def _grader_paged_attention(q, k_pool, v_pool, block_tables, context_lens):
    """The grader's paged attention (7.2's batched contract, one sequence at a time), so the model run does not
    depend on the learner's 7.2."""
    import math

    import torch
    size, group, outs = k_pool.shape[1], q.shape[1] // k_pool.shape[2], []
    for query, table, length in zip(q, block_tables, context_lens):
        positions = torch.arange(length)
        blocks = torch.tensor(list(table), dtype=torch.long)[positions // size]
        k = k_pool[blocks, positions % size].repeat_interleave(group, dim=1)
        v = v_pool[blocks, positions % size].repeat_interleave(group, dim=1)
        probs = torch.softmax(torch.einsum("hd,thd->ht", query, k).float() / math.sqrt(q.shape[2]), dim=-1)
        outs.append(torch.einsum("ht,thd->hd", probs.to(q.dtype), v))
    return torch.stack(outs)


def check_model(impl):
    """The tiny Llama on a paged cache (small pool: preemption; prefix caching; a budget that chunks prompts),
    every step the learner's, compared with the reference: transformers' greedy tokens for every prompt."""
    import types

    from helpers.course import tiny_llama
    from helpers.course.engine import PagedRunner
    from helpers.course.paged_llama import PagedLlamaRunner
    step, failures = _impl(impl).schedule_step, []
    model = tiny_llama.load_model()
    ids = tiny_llama.encode(tiny_llama.CORPUS_PATH.read_text(encoding="utf-8"))
    prompts = [ids[:20], ids[100:160], ids[:20] + ids[300:330], ids[40:100]]
    new = 6
    want = [tiny_llama.generate(model, p, new) for p in prompts]
    paged = PagedLlamaRunner(model, num_blocks=12, block_size=8)
    paged.paged = types.SimpleNamespace(paged_attention=_grader_paged_attention)
    paged.manager = GraderBlocks(12, 8, caching=True)
    kv = KVCacheManager(12, 8, True, block_manager=paged.manager)
    config = SchedulerConfig(max_num_batched_tokens=24, long_prefill_token_threshold=16)
    engine = LLMEngine(PagedRunner(paged), kv, config, schedule_step=_graded(step))
    requests = [Request(i, p, new, arrival=0.0) for i, p in enumerate(prompts)]
    label = "the tiny Llama on 12 blocks of 8, prefix caching, max_num_batched_tokens=24, threshold 16"
    try:
        run_requests(engine, requests, max_steps=500)
    except NotImplementedError:
        raise
    except _Mismatch as exc:
        return [f"[7.4] {label}: {exc}"]
    except Exception as exc:
        return [f"[7.4] {label}: {type(exc).__name__}: {exc} {WHERE}"]
    got = [r.tokens for r in requests]
    if got != want:
        bad = next(i for i in range(len(prompts)) if got[i] != want[i])
        failures.append(f"[7.4] {label}: prompt {bad} gave {got[bad]}, transformers {want[bad]} {WHERE}")
    if not engine.scheduler.num_preemptions or kv.stats.hits == 0:
        failures.append(f"[7.4] {label}: the run should preempt and hit the prefix cache (preemptions "
                        f"{engine.scheduler.num_preemptions}, hits {kv.stats.hits}): the grader's workload is wrong")
    return failures


# ------------------------------------------------------------------------------------- the graded tests

def _job(rank, world_size, checks, impl_name=None):
    """Runs in a launched rank: the learner's code never runs in the grading process."""
    impl = None
    if impl_name is not None:
        from tests.graders import planted_ch07_chunked_prefill as planted
        impl = planted.build(impl_name)
    return [f for name in checks for f in CHECKS[name](impl)]


CHECKS = {"step": check_step, "engine": check_engine, "model": check_model}


def _assert_none(failures):
    assert not failures, "\n".join(failures[:6]) + (f"\n... and {len(failures) - 6} more" if len(failures) > 6 else "")


@pytest.mark.exercise("7.4", "One scheduler step: vLLM V1's token budget, preemption and admission")
def test_schedule_step():
    _assert_none(launch(_job, 1, ["step"], show_output=False)[0])


@pytest.mark.exercise("7.4", "One scheduler step: vLLM V1's token budget, preemption and admission")
def test_engine_runs_with_schedule_step():
    # the model run takes a few seconds on a quiet machine: leave it room on a busy one (a hang still ends)
    _assert_none(launch(_job, 1, ["engine", "model"], show_output=False, timeout=120)[0])


# ------------------------------------------------------------- planted wrong answers (not an exercise)

# Every answer through step, engine, then model, up to its first failure (the model runs only for answers that pass
# the rest: the alternatives and the reference).
planted_results, test_planted_mistakes_are_caught, test_valid_alternatives_pass, test_reference_passes = \
    planted_tests("planted_ch07_chunked_prefill", CHECKS, "solutions.chunked_prefill", timeout=180,
                  exercise="7.4", check="step+engine+model")


def test_the_engine_refuses_a_step_that_breaks_its_rules():
    """The scheduler checks what any step function returns: over the budget, a request not running, more tokens
    than it has to compute — a ScheduleError naming the rule (given code, no exercise)."""
    from helpers.course.engine import ScheduleError
    from helpers.course.engine.request import RequestStatus as Status

    def bad(kind):
        def step(running, waiting, kv, config):
            plan = type("Plan", (), {})()
            plan.preempted = []
            request = waiting.popleft()
            request.status = Status.RUNNING
            running.append(request)
            plan.num_scheduled_tokens = {"over": {request.rid: config.max_num_batched_tokens + 1},
                                         "ghost": {"nobody": 1},
                                         "past": {request.rid: request.num_tokens + 1}}[kind]
            return plan
        return step
    for kind in ("over", "ghost", "past"):
        engine = LLMEngine.modelled(None, config=SchedulerConfig(max_num_batched_tokens=8), schedule_step=bad(kind))
        engine.add_request(Request(0, list(range(20)), 4, arrival=0.0))
        with pytest.raises(ScheduleError):
            engine.step()
