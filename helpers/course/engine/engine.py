"""The course's serving engine, written once: schedule → run → sample, one step at a time.

    engine = LLMEngine.paged(model, num_blocks=64, block_size=16, enable_prefix_caching=True,
                             config=SchedulerConfig(max_num_batched_tokens=256))
    engine.add_request(Request(0, prompt=[72, 105], max_tokens=16))
    while engine.has_unfinished:
        for request in engine.step():          # the requests that finished in this step
            print(request.rid, request.tokens)
        for request in engine.take_failed():   # requests that raised (request.error says why): only they stop
            print(request.rid, request.error)

What differs between the course's replicas is a part, not a copy of this loop (nano-vllm's shape:
`llm_engine.py` step = schedule, run, postprocess; vLLM V1's EngineCore.step):
  the runner   how a step's tokens are computed (runner.py: paged cache in one forward, contiguous cache, none)
  the KV side  kv_cache_manager.py (paged blocks, prefix caching, KV events) or UnlimitedKV
  the clock    clock.py: wall time (a server) or modelled device time (a replay, chapter 7's figures)
  the policy   SchedulerConfig (vLLM's options; policy="decode_first" for chapter 7's contrast) and chapter 6's
               batching: "continuous" (vLLM), "static" (nothing joins a batch until all of it is done),
               "none" (one request at a time)
  a connector  kv_connector.py: KV that another process or tier supplies (none by default)
  a proposer   speculative decoding (chapter 10, helpers/course/speculative.py: n-gram lookup, a draft model):
               after a step it guesses up to num_speculative_tokens tokens per decoding request
               (request.spec_token_ids); the next schedule charges them to the token budget as tokens of that
               request, the paged runner scores every position of the step in its one forward, and exercise 10.2
               (verify_and_rollback) keeps the accepted ones and rolls the rest back. vLLM V1 the same way:
               scheduler.py `schedule` (num_tokens_with_spec) and `update_from_output` (num_computed_tokens -=
               num_rejected), gpu_model_runner.py `propose_draft_token_ids` after sampling, EngineCore.post_step
               handing the drafts to the scheduler (`update_draft_token_ids`).

One request's failure is that request's alone: a step that raises is run again one request at a time, and only
the request that raises fails; a sampling error fails only its request. A server answers a failed request with
an error; the replica lives.
"""
from __future__ import annotations

import time
import traceback

import torch

from helpers.course.engine.clock import ModelledClock, WallClock
from helpers.course.engine.kv_cache_manager import KVCacheManager, UnlimitedKV
from helpers.course.engine.request import Request, RequestStatus
from helpers.course.engine.runner import ContiguousRunner, ModelledRunner, PagedRunner
from helpers.course.engine.sampling import sample, token_logprobs
from helpers.course.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput, continuous_batching_step
from helpers.course.engine.stats import EngineResult, StepRecord
from helpers.course.kv_cache import OutOfBlocks

__all__ = ["LLMEngine", "BATCHING", "run_requests"]

BATCHING = ("none", "static", "continuous")


class LLMEngine:
    """runner: runner.py; kv: a KVCacheManager (or UnlimitedKV); config: SchedulerConfig; clock: WallClock or
    ModelledClock; connector: a KVConnector or None; batching: continuous, static or none; schedule_step: the
    step function (default exercise 7.4's, by load_impl); record_steps: keep a StepRecord per step (a long-lived
    server counts steps only). proposer: None, or speculative decoding's (anything with propose(requests, k) ->
    {rid: (draft ids, draft probs [n, vocab] or None)} and release(rid)), with num_speculative_tokens = k >= 1 and
    verify (default exercise 10.2's verify_and_rollback, by load_impl); needs a paged runner. spec_stats: its
    counters (helpers/course/speculative.py SpecStats; None without a proposer)."""

    def __init__(self, runner, kv=None, config: SchedulerConfig | None = None, clock=None, connector=None,
                 batching: str = "continuous", schedule_step=None, record_steps: bool = True, proposer=None,
                 num_speculative_tokens: int = 0, verify=None):
        if batching not in BATCHING:
            raise ValueError(f"batching={batching!r}: choose one of {', '.join(BATCHING)}")
        if proposer is not None and (num_speculative_tokens < 1 or getattr(runner, "paged", None) is None):
            raise ValueError(f"a proposer needs num_speculative_tokens >= 1 (got {num_speculative_tokens}) and a "
                             f"paged runner (got {type(runner).__name__}): the verification scores every position")
        config = config or SchedulerConfig()
        if batching == "none" and config.max_num_seqs != 1:
            config = SchedulerConfig(**{**vars(config), "max_num_seqs": 1})
        self.runner, self.kv, self.config, self.batching = runner, kv or UnlimitedKV(), config, batching
        self.clock = clock or WallClock()
        self.connector = connector
        self.scheduler = Scheduler(self.kv, config, connector, schedule_step)
        self.failed: list[Request] = []
        self.held: list[Request] = []          # a static batch's finished members, answered with the batch
        self.steps: list[StepRecord] = []      # every step's record (record_steps=False: a server keeps none)
        self.record_steps, self.num_steps = record_steps, 0
        self.busy_seconds = 0.0                 # time spent in steps (wall) or modelled: the replica's utilisation
        self.tokens_generated = 0
        self.proposer, self.num_speculative_tokens, self.spec_stats = proposer, num_speculative_tokens, None
        self._draft_probs: dict = {}            # rid -> the draft distributions of its spec_token_ids (or None)
        if proposer is not None:
            from helpers.course.speculative import SpecStats
            from helpers.impl import load_impl
            self.verify = verify or load_impl("speculative_decoding").verify_and_rollback
            self.spec_stats = SpecStats(accepted_per_pos=[0] * num_speculative_tokens)

    # ------------------------------------------------------------------ builders
    @classmethod
    def paged(cls, model=None, num_blocks: int = 256, block_size: int = 16, enable_prefix_caching: bool = False,
              events=None, **options) -> "LLMEngine":
        """The tiny Llama (or `model`) on a paged KV cache of num_blocks × block_size tokens."""
        from helpers.course.paged_llama import PagedLlamaRunner
        paged = PagedLlamaRunner(model, num_blocks=num_blocks, block_size=block_size,
                                 prefix_caching=enable_prefix_caching)
        kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching, events, block_manager=paged.manager)
        engine = cls(PagedRunner(paged), kv, **options)
        engine.paged_model = paged
        return engine

    @classmethod
    def contiguous(cls, model, **options) -> "LLMEngine":
        """Chapter 6's engine: a transformers model, one contiguous cache per request; whole prompts, chapter 6's
        continuous-batching step (scheduler.py's continuous_batching_step: no exercise of chapter 7 needed)."""
        options.setdefault("config", SchedulerConfig(max_num_batched_tokens=1 << 20, max_num_seqs=8))
        options.setdefault("schedule_step", continuous_batching_step)
        return cls(ContiguousRunner(model), UnlimitedKV(), **options)

    @classmethod
    def modelled(cls, kv=None, cost=None, **options) -> "LLMEngine":
        """No model: the schedule on modelled device time (ModelledClock(cost))."""
        return cls(ModelledRunner(), kv, clock=ModelledClock(cost), **options)

    # ------------------------------------------------------------------ requests
    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or bool(self.held)

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self):
        return self.scheduler.running

    def add_request(self, request: Request) -> None:
        """Queue a request. One that could never fit in the whole KV pool, even alone, fails at once (vLLM
        refuses such a request too: it checks its length against max_model_len, which the pool must hold)."""
        capacity = getattr(self.kv, "num_blocks", None)
        if capacity is not None:
            longest = request.num_prompt_tokens + request.max_tokens - 1
            if -(-longest // self.kv.block_size) > capacity:
                request.arrival = request.arrival if request.arrival is not None else self.clock.now()
                self.fail(request, OutOfBlocks(f"request {request.rid!r} of up to {longest} tokens does not fit in "
                                               f"the whole pool ({capacity} blocks of {self.kv.block_size})"))
                return
        self.scheduler.add_request(request)

    def abort(self, rid) -> bool:
        """Drop a request (its client went away). True if it was queued or running here."""
        for request in [*self.scheduler.waiting, *self.scheduler.running, *self.held]:
            if request.rid == rid:
                self._retire(request, RequestStatus.ABORTED)
                return True
        return False

    def take_failed(self) -> list[Request]:
        """The requests that failed since the last call (each with .error and .traceback), forgotten here."""
        failed, self.failed = self.failed, []
        return failed

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self) -> list[Request]:
        """Schedule, run one forward, sample (or verify a request's drafts), propose; returns the requests that
        finished in this step."""
        started, start = time.perf_counter(), self.clock.now()
        output = self.scheduler.schedule(admit=not (self.batching == "static" and self.scheduler.running))
        if not output.scheduled:
            self._unschedulable()
            return self._finished([])
        for request in output.admitted:
            if request.started is None:
                request.started = start
        for request in output.preempted:
            self.runner.release(request.rid)
            self._release_drafts(request.rid)
        self._load_external(output)
        logits = self._execute(output)
        decodes, chunks, num_drafts = [], [], 0
        for request in output.scheduled:
            drafts = len(output.spec_decode_tokens.get(request.rid, ()))
            n = output.num_scheduled_tokens[request.rid] - drafts       # the request's own tokens
            if n == 1 and request.tokens and request.num_computed_tokens == request.num_tokens - 1:
                decodes.append(request.rid)
            else:
                chunks.append((request.rid, n))
            num_drafts += drafts
            if not drafts:                       # with drafts, exercise 10.2 counts what was computed
                request.num_computed_tokens += n
        seconds = self.clock.step(len(decodes), sum(n for _, n in chunks) + num_drafts,
                                  time.perf_counter() - started)
        now = self.clock.now()
        for request in output.scheduled:
            if request.rid in logits and request.status == RequestStatus.RUNNING:
                if request.rid in output.spec_decode_tokens:
                    self._verify(request, output.spec_decode_tokens[request.rid], logits[request.rid], now)
                else:
                    self._append(request, logits[request.rid], now)
        self._save_external(output)
        if self.proposer is not None:
            self.spec_stats.target_forwards += 1
            self._propose(output.scheduled)
        self.num_steps += 1
        if self.record_steps:
            self.steps.append(StepRecord(start, seconds, tuple(decodes), tuple(chunks),
                                         tuple(r.rid for r in output.preempted)))
        self.busy_seconds += seconds
        return self._finished([r for r in output.scheduled if r.done and r.status == RequestStatus.RUNNING])

    def _execute(self, output: SchedulerOutput) -> dict:
        run = self._score if self.proposer is not None else self.runner.execute
        try:
            return run(output, self.kv)
        except Exception as e:
            if len(output.scheduled) == 1:
                self.fail(output.scheduled[0], e)
                return {}
        logits = {}
        for request in list(output.scheduled):     # find the request that breaks the step: each alone
            alone = SchedulerOutput({request.rid: output.num_scheduled_tokens[request.rid]}, [request])
            if request.rid in output.spec_decode_tokens:
                alone.spec_decode_tokens[request.rid] = output.spec_decode_tokens[request.rid]
            try:
                logits.update(run(alone, self.kv))
            except Exception as e:
                self.fail(request, e)
        return logits

    # ------------------------------------------------------------------ speculative decoding (a proposer)
    def _score(self, output: SchedulerOutput, kv) -> dict:
        """The paged runner's one forward over every scheduled token, draft tokens included (each request's own
        tokens, then its drafts: one causal chunk), with the logits of every position (forward_batch(...,
        all_logits=True)). Returns {rid: logits} for the requests due a token: [vocab] for a request without
        drafts, [1 + drafts, vocab] for one with (row i follows its last token and drafts 0 .. i - 1)."""
        batch, spans = [], []
        for request in output.scheduled:
            drafts = output.spec_decode_tokens.get(request.rid, [])
            first = request.num_computed_tokens
            n = output.num_scheduled_tokens[request.rid] - len(drafts)
            batch.append((request.rid, request.all_token_ids[first:first + n] + list(drafts), first))
            spans.append((request, n, len(drafts), first + n == request.num_tokens))
        logits = self.runner.paged.forward_batch(batch, all_logits=True)       # [all scheduled tokens, vocab]
        out, row = {}, 0
        for request, n, drafts, due in spans:
            if due:
                out[request.rid] = logits[row + n - 1:row + n + drafts] if drafts else logits[row + n - 1]
            row += n + drafts
        return out

    def _verify(self, request: Request, drafts: list, logits, now: float) -> None:
        """Exercise 10.2 on one request: keep the accepted drafts and one target token, roll the rest back."""
        probs = self._draft_probs.pop(request.rid, None)
        probs = None if probs is None else probs[:len(drafts)]
        before = len(request.tokens)
        try:
            self.verify(request, drafts, logits, self.kv, probs)
        except Exception as e:
            self.fail(request, e)
            return
        emitted = len(request.tokens) - before
        request.token_times.extend([now] * emitted)
        self.tokens_generated += emitted
        stats = self.spec_stats
        accepted = max(0, min(emitted - 1, len(drafts)))      # emitted = accepted drafts + the target's token
        stats.num_drafts += 1
        stats.num_draft_tokens += len(drafts)
        stats.num_accepted_tokens += accepted
        stats.tokens_generated += emitted
        for i in range(accepted):
            stats.accepted_per_pos[i] += 1

    def _propose(self, scheduled: list) -> None:
        """After the step (vLLM's propose_draft_token_ids): drafts for every request of the step that is decoding
        (a token sampled, nothing else to compute), at most k, and no more than it may still emit after the target's
        own token next step, nor past the model's positions. They wait in request.spec_token_ids."""
        k, limit = self.num_speculative_tokens, getattr(self.runner.paged, "max_positions", None) or 1 << 30
        room = {r.rid: min(k, r.max_tokens - len(r.tokens) - 1, limit - r.num_tokens) for r in scheduled
                if r.status == RequestStatus.RUNNING and r.tokens and r.num_computed_tokens == r.num_tokens - 1}
        asked = [r for r in scheduled if room.get(r.rid, 0) > 0]
        proposals = self.proposer.propose(asked, k) if asked else {}
        for request in asked:
            drafts, probs = proposals.get(request.rid, ([], None))
            request.spec_token_ids = [int(t) for t in drafts][:room[request.rid]]
            self._draft_probs[request.rid] = None if probs is None else probs[:len(request.spec_token_ids)]

    def _release_drafts(self, rid) -> None:
        if self.proposer is not None:
            self.proposer.release(rid)
            self._draft_probs.pop(rid, None)

    def _append(self, request: Request, logits, now: float) -> None:
        try:
            token = logits if isinstance(logits, int) else sample(logits, request.temperature, request.top_p,
                                                                   request.generator)
            if request.logprobs is not None and not isinstance(logits, int):   # a modelled runner has no logits
                request.output_logprobs.append(token_logprobs(logits, token, request.logprobs))
        except Exception as e:          # sampling failed for this request only
            self.fail(request, e)
            return
        request.tokens.append(token)
        request.token_times.append(now)
        self.tokens_generated += 1
        if self.spec_stats is not None:
            self.spec_stats.tokens_generated += 1

    def _finished(self, done: list[Request]) -> list[Request]:
        now = self.clock.now()
        for request in done:
            self._retire(request, RequestStatus.FINISHED, now)
        if self.batching == "static":
            self.held.extend(done)
            if self.scheduler.running:
                return []
            done, self.held = self.held, []
        return done

    def _retire(self, request: Request, status: RequestStatus, now: float | None = None) -> None:
        self.scheduler.finish(request, status)
        self.runner.release(request.rid)
        self._release_drafts(request.rid)
        if request in self.held and status != RequestStatus.FINISHED:
            self.held.remove(request)
        request.finished = self.clock.now() if now is None else now

    def fail(self, request: Request, error: BaseException) -> None:
        """Take `request` out of the engine as failed (its error noted); the others carry on."""
        request.error, request.traceback = f"{type(error).__name__}: {error}", traceback.format_exc()
        self._retire(request, RequestStatus.FAILED)
        self.failed.append(request)

    def _unschedulable(self) -> None:
        """Nothing could be scheduled: with nothing running, the head of the queue can never fit."""
        if self.scheduler.waiting and not self.scheduler.running:
            request = self.scheduler.waiting[0]
            blocks = getattr(self.kv, "num_blocks", "?")
            self.fail(request, OutOfBlocks(f"request {request.rid!r} of {request.num_tokens} tokens does not fit in "
                                            f"the whole pool ({blocks} blocks)"))

    # ------------------------------------------------------------------ the connector
    def _pool_io(self):
        """The paged runner's pool; None for a runner without one (a modelled run: the connector's load and save
        get write=None and read=None, only the schedule and the clock matter)."""
        paged = getattr(self.runner, "paged", None)
        return None if paged is None else paged.pool

    def _load_external(self, output: SchedulerOutput) -> None:
        if self.connector is None or not output.external:
            return
        pool = self._pool_io()
        for rid, (start, count) in output.external.items():
            request = next(r for r in output.scheduled if r.rid == rid)
            table = None if pool is None else self.kv.block_table(rid)
            self.connector.load(request, start, count, None if pool is None else
                                lambda layer, k, v, table=table, start=start: pool.write(layer, table, start, k, v))
        output.external.clear()

    def _save_external(self, output: SchedulerOutput) -> None:
        if self.connector is None:
            return
        pool = self._pool_io()
        for request in output.scheduled:
            if request.status != RequestStatus.RUNNING and not request.done:
                continue
            if pool is None:
                self.connector.save(request, request.num_computed_tokens, None)
                continue
            if request.rid not in self.kv.block_manager.tables:
                continue
            table = self.kv.block_table(request.rid)

            def read(layer, start, count, table=table):
                k, v = pool.gather(layer, table, start + count)
                return k[start:], v[start:]
            self.connector.save(request, request.num_computed_tokens, read)

    # ------------------------------------------------------------------ figures
    def kv_stats(self) -> dict:
        """The KV cache's figures a server exports (vLLM's names in metrics.py)."""
        stats = self.kv.stats
        out = {"preemptions": self.scheduler.num_preemptions, "prefix_queries": stats.queries,
               "prefix_hits": stats.hits}
        if isinstance(self.kv, KVCacheManager):
            out.update(kv_blocks=self.kv.num_blocks, kv_blocks_used=self.kv.num_blocks - self.kv.num_free_blocks)
        return out


def run_requests(engine: LLMEngine, requests: list[Request], label: str = "", max_steps: int = 1_000_000
                 ) -> EngineResult:
    """Serve `requests` (each with its .arrival on the engine's clock) to the end: a request joins the queue at
    the first step that starts at or after its arrival; an idle engine waits for the next one. Returns the
    EngineResult (requests in arrival order, steps). Failed requests raise (a replay has no one to answer)."""
    pending = sorted(requests, key=lambda r: r.arrival)
    pending.reverse()
    ordered = list(reversed(pending))
    for _ in range(max_steps):
        while pending and pending[-1].arrival <= engine.clock.now():
            engine.add_request(pending.pop())
        if not engine.has_unfinished:
            if not pending:
                break
            engine.clock.wait_until(pending[-1].arrival)
            continue
        engine.step()
        failed = engine.take_failed()
        if failed:
            raise RuntimeError(f"request {failed[0].rid!r} failed: {failed[0].error}")
    else:
        raise RuntimeError(f"the engine did not finish in {max_steps} steps")
    return EngineResult(ordered, engine.steps, label)
