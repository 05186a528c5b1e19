"""Chapter 6's engine on chapter 7's pieces: the server's continuous batching over a paged KV cache, with
prefix caching and chunked prefill — what vLLM's `--block-size`, `--enable-prefix-caching` and
`--max-num-batched-tokens` turn on.

    engine = PagedEngine(model, max_batch=8, num_blocks=128, block_size=16, prefix_caching=True, token_budget=64)
    engine.submit(Sequence(rid=0, prompt=[72, 105], max_tokens=16))     # then drive it as Engine (engine.py)

It is `Engine` (engine.py) with a different memory layout and schedule, and the same contract: `submit`,
`step` (the sequences that finished), `take_failed`, `cancel`, sampling per request. The pieces are the
learner's, loaded with load_impl as everywhere else:

    the KV cache     helpers/course/paged_llama.py's PagedLlama: BlockManager and paged_attention (7.1, 7.2), or
                     PrefixCachingBlockManager (7.3) with prefix_caching=True
    the schedule     token_budget=None: a new sequence's prompt is prefilled whole when it is admitted, as
                     Engine does; token_budget=N: every step is exercise 7.4's `schedule_step` over the
                     admitted sequences: decodes first (1 token each), then prompt chunks, N tokens in all

A sequence is admitted when its blocks fit (`allocate`; with prefix caching its cached prompt blocks are
shared, not computed). When a decode step needs a block and none is free, the most recently admitted sequence
is PREEMPTED by recomputation (vLLM's default): its blocks are freed, it goes back to the front of the queue,
and when it is admitted again its prompt and the tokens it had generated are prefilled again (chunked like
any prompt); sampling continues from its own generator, so its tokens do not change.

Simplifications, each stated: with prefix caching and chunking, a sequence is admitted only once every
admitted prompt is fully computed (allocate registers a prompt's blocks in the cache before their keys and
values are written; vLLM tracks which cached blocks are computed instead). A batched decode step that raises
fails the sequences in it (their block tables may be half advanced); a sequence's own sampling error fails
only it. A tensor-parallel replica runs one PagedEngine per rank in lockstep (replica.py): each rank's pool
holds its own KV heads, the block tables are the same on every rank. Pipeline replicas keep their own cache.

`kv_stats()` is what the replica reports and the server exports on /metrics, under vLLM's names:
serving_kv_cache_usage_perc (vllm:kv_cache_usage_perc), serving_prefix_cache_queries_total and
serving_prefix_cache_hits_total (vllm:prefix_cache_queries / _hits, prompt tokens),
serving_num_preemptions_total (vllm:num_preemptions).
"""
from __future__ import annotations

import time

from helpers.course.engine_loop import Request, check_schedule
from helpers.course.kv_cache import OutOfBlocks
from helpers.course.paged_llama import PagedLlama
from helpers.course.serving.engine import Engine, Sequence
from helpers.impl import load_impl

__all__ = ["PagedEngine"]


class PagedEngine(Engine):
    """Engine (engine.py) with its KV cache in blocks (PagedLlama), prefix caching and chunked prefill."""

    def __init__(self, model, max_batch: int = 8, batching: str = "continuous", num_blocks: int = 256,
                 block_size: int = 16, prefix_caching: bool = False, token_budget: int | None = None):
        super().__init__(model, max_batch=max_batch, batching=batching)
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be at least 1")
        if token_budget is not None and token_budget < 1:
            raise ValueError(f"token_budget={token_budget} must be at least 1 (or None: whole prompts)")
        self.runner = PagedLlama(model, num_blocks=num_blocks, block_size=block_size, prefix_caching=prefix_caching)
        self.token_budget = token_budget
        self.schedule_step = load_impl("chunked_prefill").schedule_step if token_budget is not None else None

    # ------------------------------------------------------------------------------ the step
    def step(self) -> list[Sequence]:
        """Engine.step (admit, one step, the finished sequences out), then the finished sequences' blocks
        go back to the pool."""
        finished = super().step()
        for seq in finished:
            self._release(seq)
        return finished

    def _admit(self) -> None:
        if self.batching == "static" and self.running:
            return
        while self.waiting and len(self.running) < self.max_batch:
            if self.runner.prefix_caching and self.token_budget is not None and \
                    any(not self._decoding(s) for s in self.running):
                return   # a prompt is still being computed: its cached blocks are not written yet
            seq = self.waiting[0]
            context = seq.prompt + seq.tokens   # after a preemption: the tokens generated so far, recomputed
            try:
                cached = self.runner.allocate(seq.rid, context)
            except OutOfBlocks as e:
                if self.running:
                    return   # wait for blocks to free up
                self.fail(seq, OutOfBlocks(f"{len(context)} tokens do not fit in the whole pool ({e})"))
                continue
            except Exception as e:   # this request's failure, not the replica's
                self.fail(seq, e)
                continue
            self.waiting.popleft()
            seq.context, seq.computed = context, cached
            if seq.started is None:
                seq.started = time.monotonic()
            self.running.append(seq)
            if self.token_budget is None:
                try:
                    self._prefill_chunk(seq, len(context) - cached)
                except Exception as e:
                    self.fail(seq, e)

    def _decode(self, live: list[Sequence]) -> None:
        """Engine.step's one step over the admitted sequences not done yet: their decodes (whole prompts were
        prefilled at admission), or with a token budget, 7.4's schedule of decodes and prompt chunks."""
        if self.token_budget is None:
            self._decode_paged(live)
        else:
            self._scheduled_step(live)

    def _scheduled_step(self, live: list[Sequence]) -> None:
        """One step of exercise 7.4's schedule: every admitted sequence is a Request (prompt = its context)."""
        views = [Request(i, len(s.context), max(1, s.max_tokens), computed=s.computed) for i, s in enumerate(live)]
        schedule = check_schedule(self.schedule_step(list(views), [], self.token_budget, True), views, [],
                                  self.token_budget)
        for req, n in schedule:
            if not req.prefilled:
                seq = live[req.rid]
                try:
                    self._prefill_chunk(seq, n)
                except Exception as e:
                    self.fail(seq, e)
        self._decode_paged([live[req.rid] for req, _ in schedule if req.prefilled])

    def _prefill_chunk(self, seq: Sequence, n: int) -> None:
        """Compute the next n positions of seq's context; the last one gives its next token."""
        end = seq.computed + n
        logits = self.runner.prefill(seq.rid, seq.context[:end], start=seq.computed)
        seq.computed = end
        if end == len(seq.context):
            self._append(seq, logits[-1])
            if seq.first_token is None:
                seq.first_token = time.monotonic()

    def _decode_paged(self, seqs: list[Sequence]) -> None:
        """One batched decode step of `seqs`, preempting the most recently admitted while blocks are short."""
        seqs = [s for s in seqs if s in self.running and not s.done]
        try:
            victims = self.runner.preempt_for_decode([s.rid for s in seqs], [s.rid for s in self.running])
        except OutOfBlocks as e:   # the only sequence admitted cannot grow: it never will
            self.fail(self.running[0], e)
            return
        for rid in victims:        # their blocks are free: back to the front of the queue, recomputed later
            seq = next(s for s in self.running if s.rid == rid)
            self.running.remove(seq)
            self.waiting.appendleft(seq)
        seqs = [s for s in seqs if s in self.running]
        if not seqs:
            return
        try:
            logits = self.runner.decode([s.rid for s in seqs], [s.tokens[-1] for s in seqs])
        except Exception as e:
            for seq in seqs:
                self.fail(seq, e)
            return
        for seq, row in zip(seqs, logits):
            try:
                self._append(seq, row)
            except Exception as e:   # sampling failed for this sequence only
                self.fail(seq, e)

    # ------------------------------------------------------------------------------ blocks
    @staticmethod
    def _decoding(seq: Sequence) -> bool:
        return seq.computed == len(seq.context)

    def _release(self, seq: Sequence) -> None:
        if seq.rid in self.runner.manager.tables:
            self.runner.free(seq.rid)

    def fail(self, seq: Sequence, error: BaseException) -> None:
        self._release(seq)
        super().fail(seq, error)

    def cancel(self, rid) -> bool:
        for seq in [*self.waiting, *self.running]:
            if seq.rid == rid:
                self._release(seq)
        return super().cancel(rid)

    def kv_stats(self) -> dict:
        manager = self.runner.manager
        return {"kv_blocks_used": manager.num_blocks - manager.num_free_blocks, "kv_blocks": manager.num_blocks,
                "prefix_queries": getattr(manager, "query_tokens", 0), "prefix_hits": getattr(manager, "hit_tokens", 0),
                "preemptions": self.runner.stats["preemptions"]}
