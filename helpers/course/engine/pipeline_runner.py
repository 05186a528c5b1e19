"""The course's engine on a pipeline of stages, with several batches in flight (chapter 6's `--pp` replicas).

One scheduler, on the first stage's first rank, decides every step (the engine's Scheduler, KVCacheManager and
Request, unchanged); each stage computes its slice of the layers and keeps the KV cache of those layers only;
activations go stage to stage; the last stage sends the logits of the requests that are due back to the
scheduler, which samples (so seeded sampling gives the single-process engine's tokens too). What makes a pipeline
pipeline is the *batch queue*: the scheduler does not wait for a batch to come back before it schedules the next.

    vLLM 0.32, vllm/v1/engine/core.py `EngineCore.step_with_batch_queue`: with pipeline_parallel_size > 1 the engine
      keeps a deque of up to `max_concurrent_batches` scheduled batches (vllm/config/vllm.py: "PP requires PP-size
      concurrent batches to fill the pipeline", so pp of them). Each call first tries to schedule and launch a new
      batch (non-blocking) while the queue is not full; only when it is full, or nothing more can be scheduled, does
      it block on the OLDEST batch, then `update_from_output` appends its sampled tokens.
    vllm/v1/core/sched/scheduler.py `schedule`: the scheduler advances num_computed_tokens when it schedules
      (`_update_after_schedule`), so a request whose tokens are still in flight has 0 new tokens and is skipped
      ("PP>1 and we have already scheduled all prompt tokens but they are not finished yet", `continue`, not
      `break`): a request is in at most one batch in flight. `PipelineEngine` keeps the course's rule (the engine
      advances num_computed_tokens when the batch comes back) and tells the scheduler which requests are in
      flight instead, `Scheduler.schedule(skip=...)`, with the same effect.
    vllm/v1/executor/multiproc_executor.py: the scheduler output goes to every worker (`rpc_broadcast_mq`), the
      output comes back from one rank only, `_get_output_rank`: "TP rank=0 and PP rank=-1". Here the step's plan
      travels with the activations, stage to stage (one message per hop), and the last stage's tp rank 0 answers.
    vLLM's last stage samples and returns token ids, which the scheduler sends to the first stage with the next
      scheduler output ("When using PP, the scheduler sends the sampled tokens back", scheduler.py); here the last
      stage returns the due requests' logits (a 256-token vocabulary) and the scheduler's rank samples them with
      the engine's own `sample`, so a request's seeded generator lives in one place.

So a request decodes at most one token per pipeline round; with pp batches in flight, batch b computes in stage 1
while batch b+1 computes in stage 0. The batches form by themselves under load: a request that arrives while
batch b is in flight joins batch b+1, and the two groups then alternate (vLLM V1 does the same; requests that all
arrive at once stay in one batch, and the pipeline has a bubble — its V2 runner with async scheduling staggers
decodes instead, `decode_stagger` in vllm/v1/core/sched/async_scheduler.py).

    stages = [PipelineStageRunner(LlamaStage(model, s, 2), kv_cache="paged", num_blocks=64) for s in range(2)]
    engine = PipelineEngine.build(LocalPipeline(stages), kv_cache="paged", num_blocks=64)
    engine.add_request(Request(0, prompt, 16))
    while engine.has_unfinished:
        engine.step()                        # launch a batch, or wait for the oldest one and sample

`LocalPipeline` runs the stages one after another in this process (the same messages; no overlap, for tests and
a notebook); helpers/course/serving/pipeline_replica.py runs one stage per rank (gloo send/recv) and is where
the overlap is real. `modelled_pipeline` replays a run's launches and completions with modelled stage costs
(clock.py's step_seconds, 1/pp of the layers per stage): the figure that holds on a busy 2-core machine.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import accumulate

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from helpers.course.engine.clock import step_seconds
from helpers.course.engine.engine import LLMEngine
from helpers.course.engine.kv_cache_manager import KVCacheManager, UnlimitedKV
from helpers.course.engine.request import RequestStatus
from helpers.course.engine.scheduler import SchedulerConfig, continuous_batching_step
from helpers.course.kv_cache import KVPool, slots_of
from helpers.impl import load_impl

__all__ = ["PipelineBatch", "PipelineStageRunner", "PipelineEngine", "LocalPipeline", "modelled_pipeline",
           "both_busy_seconds"]

KV_CACHES = ("contiguous", "paged")


@dataclass
class PipelineBatch:
    """What travels down the pipeline for one scheduled step (vLLM's SchedulerOutput, in the course's size).
    entries: (rid, start, n, block table or None) per scheduled request, in order; token_ids: their tokens, flat
    (only the first stage reads them); due: the rids whose next token comes out of this step (the last stage
    returns their logits); release: rids every stage forgets before it computes (finished, aborted, preempted);
    stop: the replica is shutting down."""
    batch_id: int
    entries: list = field(default_factory=list)
    token_ids: list = field(default_factory=list)
    due: list = field(default_factory=list)
    release: list = field(default_factory=list)
    stop: bool = False


class PipelineStageRunner:
    """One stage: `stage` is a chapter 3 LlamaStage (helpers/course/llama_stages.py; on a tp > 1 stage, one built by
    chapter 5's build_hybrid_stage on shard_llama's sharded layers), and this stage's KV cache:

      "contiguous"  a transformers DynamicCache per request for this stage's layers; each request runs through the
                    stage alone (chapter 3's LlamaStage.forward)
      "paged"       a KVPool of this stage's layers only, num_blocks × block_size; the block tables come with the
                    batch (the scheduler's KVCacheManager decides them, as vLLM's scheduler does), so every stage's
                    pool uses the same block ids; one forward over the whole batch, as helpers/course/paged_llama.py
                    `forward_batch` does for the whole model (which fuses q/k/v and gate/up into one matmul
                    each: the same tokens, logits equal within float32 rounding)

    run(batch, x) computes the batch: x is None on the first stage (it embeds batch.token_ids), the previous stage's
    hidden states [tokens, hidden] otherwise; returns hidden states, or on the last stage {rid: logits [vocab]} of
    the due requests. `last_interval`: (batch_id, start, end) in perf_counter seconds of the last batch computed."""

    def __init__(self, stage, kv_cache: str = "contiguous", num_blocks: int = 256, block_size: int = 16):
        if kv_cache not in KV_CACHES:
            raise ValueError(f"kv_cache={kv_cache!r}: choose one of {', '.join(KV_CACHES)}")
        self.stage, self.kv_cache = stage, kv_cache
        self.is_first, self.is_last = stage.is_first, stage.is_last
        self.caches: dict = {}                              # contiguous: rid -> DynamicCache
        self.first_layer = stage.layers[0].self_attn.layer_idx     # DynamicCache indexes layers globally
        self.last_interval = None
        if kv_cache == "paged":
            config = stage.config
            self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            attention = stage.layers[0].self_attn
            self.heads = attention.q_proj.weight.shape[0] // self.head_dim      # this rank's (tp: sharded)
            self.kv_heads = attention.k_proj.weight.shape[0] // self.head_dim
            self.pool = KVPool(len(stage.layers), num_blocks, block_size, self.kv_heads, self.head_dim,
                               dtype=next(stage.parameters()).dtype)
            self.paged = load_impl("paged_kv_cache")                          # exercise 7.2's paged_attention

    @property
    def num_requests(self) -> int:
        """Requests this stage holds state for (contiguous: their caches; paged: the pool is the scheduler's)."""
        return len(self.caches)

    def release(self, rids) -> None:
        for rid in rids:
            self.caches.pop(rid, None)

    @torch.no_grad()
    def run(self, batch: PipelineBatch, x):
        self.release(batch.release)
        self.last_interval = None
        if not batch.entries:
            return None
        start = time.perf_counter()
        out = self._paged(batch, x) if self.kv_cache == "paged" else self._contiguous(batch, x)
        self.last_interval = (batch.batch_id, start, time.perf_counter())
        return out

    def trail(self, stage_index: int) -> tuple:
        """(stage, requests held, [interval]) of the batch just run: what this stage adds to the answer."""
        return stage_index, self.num_requests, [self.last_interval] if self.last_interval else []

    def _contiguous(self, batch: PipelineBatch, x):
        rows, outputs, logits = 0, [], {}
        for rid, start, n, _ in batch.entries:
            if start == 0:
                self.caches[rid] = self.stage.new_cache()
            cache = self.caches.get(rid)
            held = 0 if cache is None else cache.get_seq_length(self.first_layer)
            if cache is None or held != start:
                raise RuntimeError(f"stage {self.stage.stage_index}: request {rid!r} computes from position {start} "
                                   f"but this stage holds {held}")
            if self.is_first:
                inp = torch.tensor([batch.token_ids[rows:rows + n]])
            else:
                inp = x[rows:rows + n][None]
            out = self.stage(inp, cache, start)[0]                           # [n, hidden] or [n, vocab]
            rows += n
            if self.is_last:
                logits[rid] = out[-1]
            else:
                outputs.append(out)
        if self.is_last:
            return {rid: logits[rid] for rid in batch.due}
        return torch.cat(outputs)

    def _paged(self, batch: PipelineBatch, x):
        """paged_llama.py's forward_batch over this stage's layers (the layer index is the stage's own)."""
        stage, pool, size = self.stage, self.pool, self.pool.block_size
        lengths = [n for _, _, n, _ in batch.entries]
        positions = torch.cat([torch.arange(start, start + n) for _, start, n, _ in batch.entries])
        slots = [slots_of(table, start, n, size) for _, start, n, table in batch.entries]
        blocks, offsets = torch.cat([b for b, _ in slots]), torch.cat([o for _, o in slots])
        x = stage.embed_tokens(torch.tensor(batch.token_ids)) if self.is_first else x      # [T, hidden]
        group = self.heads // self.kv_heads
        starts = list(accumulate(lengths[:-1], initial=0))
        decodes = [i for i, n in enumerate(lengths) if n == 1]
        decode_rows = torch.tensor([starts[i] for i in decodes], dtype=torch.long)
        decode_tables = [batch.entries[i][3] for i in decodes]
        decode_lens = [batch.entries[i][1] + 1 for i in decodes]
        chunks = [(starts[i], n, start, table) for i, (_, start, n, table) in enumerate(batch.entries) if n > 1]
        cos, sin = stage.rotary_emb(x, positions[None])
        for index, layer in enumerate(stage.layers):
            attn, h = layer.self_attn, layer.input_layernorm(x)
            tokens = h.shape[0]
            q = attn.q_proj(h).view(tokens, self.heads, self.head_dim)
            k = attn.k_proj(h).view(tokens, self.kv_heads, self.head_dim)
            v = attn.v_proj(h).view(tokens, self.kv_heads, self.head_dim)
            q, k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
            q, k = q[0].transpose(0, 1), k[0].transpose(0, 1)
            pool.k[index][blocks, offsets] = k.to(pool.dtype)                 # write every new K/V first
            pool.v[index][blocks, offsets] = v.to(pool.dtype)
            if not chunks:
                out = self.paged.paged_attention(q, pool.k[index], pool.v[index], decode_tables, decode_lens)
            else:
                out = torch.empty_like(q)
                if decodes:
                    out[decode_rows] = self.paged.paged_attention(q[decode_rows], pool.k[index], pool.v[index],
                                                                  decode_tables, decode_lens)
            for row, n, start, table in chunks:
                end = start + n
                keys, values = pool.gather(index, table, end)
                keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
                scores = torch.einsum("thd,shd->hts", q[row:row + n], keys) / math.sqrt(self.head_dim)
                future = torch.arange(end)[None, :] > torch.arange(start, end)[:, None]
                probs = torch.softmax(scores.masked_fill(future, float("-inf")).float(), dim=-1).to(q.dtype)
                out[row:row + n] = torch.einsum("hts,shd->thd", probs, values)
            x = x + attn.o_proj(out.reshape(tokens, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if not self.is_last:
            return x
        ends = torch.tensor(lengths).cumsum(0) - 1
        logits = stage.lm_head(stage.norm(x[ends]))
        index = {rid: i for i, (rid, _, _, _) in enumerate(batch.entries)}
        return {rid: logits[index[rid]] for rid in batch.due}


class LocalPipeline:
    """Every stage in this process, one after another: the same batches and messages as the distributed pipeline,
    without the overlap (tests; a notebook). launch() computes the batch through all stages at once; result()
    returns the oldest batch's (batch_id, logits, trail) where trail is [(stage, held requests, intervals)]."""

    def __init__(self, stages: list[PipelineStageRunner]):
        self.stages, self.results = stages, deque()

    def launch(self, batch: PipelineBatch) -> None:
        x, error = None, None
        try:
            for stage in self.stages:
                x = stage.run(batch, x)
        except Exception as e:                    # the batch's requests fail; the engine carries on
            x, error = None, f"{type(e).__name__}: {e}"
        trail = [s.trail(i) for i, s in enumerate(self.stages)]
        self.results.append((batch.batch_id, x or {}, trail, error))

    def result(self):
        return self.results.popleft()

    def stop(self) -> None:
        pass


class _Releases:
    """The engine's runner as LLMEngine sees it: release(rid) notes what every stage must forget; the stages
    hear it with the next batch."""

    def __init__(self):
        self.pending: list = []

    def release(self, rid) -> None:
        self.pending.append(rid)

    def take(self) -> list:
        out, self.pending = self.pending, []
        return out


class PipelineEngine(LLMEngine):
    """LLMEngine whose step is vLLM's step_with_batch_queue: up to `max_concurrent_batches` (pp) scheduled batches
    in flight through `executor` (LocalPipeline, or the pipeline replica's), each request in at most one of them.
    Requests, queues, aborts, failures and kv_stats are LLMEngine's. Figures: `num_batches`, `overlapped_launches`
    (batches launched while another was in flight), `trace` (("launch", id, decodes, prefill tokens) and
    ("complete", id) in the order they happened: `modelled_pipeline` replays it), `stage_requests` (requests each
    stage holds, as of the last batch back) and `intervals` (stage, batch, start, end) of each stage's compute.
    A stage that raises fails every request of that batch (its error travels down the pipeline with the batch):
    LLMEngine runs a failed step again one request at a time, which a pipeline cannot do once some stages have
    computed the batch. `broken` is True when a call of the executor raised (a send or receive failed).
    Blocks freed or shared while a batch is in flight are safe because every stage computes the batches in launch
    order: a block a finished request gave back, or a prefix-cache hit on a block an earlier batch is still
    computing, is written by the earlier batch on each stage before the later batch reads or overwrites it."""

    def __init__(self, executor, kv=None, config: SchedulerConfig | None = None, batching: str = "continuous",
                 max_concurrent_batches: int = 2, balance: bool = True, schedule_step=None,
                 record_intervals: bool = True):
        if max_concurrent_batches < 1:
            raise ValueError(f"max_concurrent_batches={max_concurrent_batches} must be at least 1")
        super().__init__(_Releases(), kv, config, batching=batching, schedule_step=schedule_step,
                         record_steps=False)
        self.executor, self.max_concurrent_batches, self.balance = executor, max_concurrent_batches, balance
        self.batch_queue: deque = deque()          # (batch, SchedulerOutput or None), oldest first
        self.in_flight: dict = {}                  # rid -> batch_id
        self.num_batches = self.overlapped_launches = 0
        self.trace: list = []
        self.stage_requests: list = []
        self.intervals: deque = deque(maxlen=4096)   # the latest (stage, batch, start, end): a server runs long
        self.record_intervals = record_intervals
        self.stage_busy: dict = {}                 # stage -> seconds it computed (all batches)
        self._busy_since = None
        self.broken = False                        # an executor call raised: the stages may be out of step

    @classmethod
    def build(cls, executor, kv_cache: str = "contiguous", num_blocks: int = 256, block_size: int = 16,
              enable_prefix_caching: bool = False, config: SchedulerConfig | None = None, **options):
        """The scheduler side for a pipeline of `executor`'s stages: contiguous (chapter 6's whole-prompt
        continuous_batching_step, no KV accounting) or paged (a KVCacheManager of num_blocks × block_size whose
        block tables go to every stage; exercise 7.4's step; prefix caching as the config says)."""
        if kv_cache == "contiguous":
            options.setdefault("schedule_step", continuous_batching_step)
            config = config or SchedulerConfig(max_num_batched_tokens=1 << 20, max_num_seqs=8)
            return cls(executor, UnlimitedKV(), config, **options)
        if kv_cache != "paged":
            raise ValueError(f"kv_cache={kv_cache!r}: choose one of {', '.join(KV_CACHES)}")
        return cls(executor, KVCacheManager(num_blocks, block_size, enable_prefix_caching), config, **options)

    @property
    def has_unfinished(self) -> bool:
        return super().has_unfinished or bool(self.batch_queue) or bool(self.runner.pending)

    # ------------------------------------------------------------------ the step
    def step(self):
        """Launch a new batch if the queue has room and something can be scheduled; return at once if the queue
        still has room. Otherwise wait for the oldest batch, sample its due requests; returns the requests that
        finished (vLLM's step_with_batch_queue)."""
        launched = False
        if len(self.batch_queue) < self.max_concurrent_batches:
            output = self._schedule()
            if output is not None:
                self._launch(output)
                launched = True
                if len(self.batch_queue) < self.max_concurrent_batches:
                    return self._finished([])
        if not self.batch_queue:
            if not launched:
                self._unschedulable()
                if self.runner.pending:                # aborted or failed: the stages forget them
                    self._send(PipelineBatch(self._next_id(), release=self.runner.take()), None)
            return self._finished([])
        return self._complete()

    def _next_id(self) -> int:
        self.num_batches += 1
        return self.num_batches

    def _schedule(self):
        """The scheduler's step with the running requests in flight skipped (`Scheduler.schedule(skip=...)`: vLLM
        skips a request with 0 new tokens); they keep their place in the running queue and count toward
        max_num_seqs. balance: a batch takes at most ceil(running / max_concurrent_batches) of the running requests
        (the oldest not in flight); the others are skipped too and wait for the next batch, so the batches in
        flight share the running requests evenly even when they all arrived at once (vLLM V1 takes every request
        not in flight; its V2 runner with async scheduling staggers decodes over the pp steps instead). Preemption,
        when blocks run out, picks the newest request of those not skipped (vLLM may pick one in flight and drops
        its stale output when it comes back)."""
        scheduler = self.scheduler
        if not scheduler.has_unfinished:
            return None
        running, in_flight = scheduler.running, self.in_flight
        skip = in_flight
        if self.balance and self.max_concurrent_batches > 1 and running:
            cap = -(-len(running) // self.max_concurrent_batches)
            rest = [r.rid for r in running if r.rid not in in_flight][cap:]
            if rest:
                skip = {*in_flight, *rest}
        admit = not (self.batching == "static" and running)
        return self._nonempty(scheduler.schedule(admit=admit, skip=skip))

    @staticmethod
    def _nonempty(output):
        return output if output.scheduled or output.preempted else None

    def _launch(self, output) -> None:
        now = self.clock.now()
        for request in output.admitted:
            if request.started is None:
                request.started = now
        for request in output.preempted:
            self.runner.release(request.rid)
        if not output.scheduled:                       # everything preempted: nothing to compute
            return
        batch = PipelineBatch(self._next_id(), release=self.runner.take())
        decodes = prefill = 0
        for request in output.scheduled:
            n = output.num_scheduled_tokens[request.rid]
            start = request.num_computed_tokens
            table = self.kv.block_table(request.rid) if isinstance(self.kv, KVCacheManager) else None
            batch.entries.append((request.rid, start, n, table))
            batch.token_ids.extend(request.all_token_ids[start:start + n])
            if start + n == request.num_tokens:
                batch.due.append(request.rid)
            if n == 1 and request.tokens and start == request.num_tokens - 1:
                decodes += 1
            else:
                prefill += n
            self.in_flight[request.rid] = batch.batch_id
        if self.batch_queue:
            self.overlapped_launches += 1
        self.trace.append(("launch", batch.batch_id, decodes, prefill))
        self._send(batch, output)

    def _send(self, batch: PipelineBatch, output) -> None:
        if not self.batch_queue:
            self._busy_since = time.perf_counter()
        self.batch_queue.append((batch, output))
        self.broken = True                             # until the executor returns
        self.executor.launch(batch)
        self.broken = False

    def _complete(self) -> list:
        batch, output = self.batch_queue.popleft()
        self.broken = True
        batch_id, logits, trail, error = self.executor.result()
        self.broken = False
        if batch_id != batch.batch_id:
            raise RuntimeError(f"the pipeline answered batch {batch_id}, the oldest in flight is {batch.batch_id}")
        if not self.batch_queue and self._busy_since is not None:
            self.busy_seconds += time.perf_counter() - self._busy_since
        self.stage_requests = [held for _, held, _ in trail]
        for stage, _, ivs in trail:
            for iv in ivs:
                self.stage_busy[stage] = self.stage_busy.get(stage, 0.0) + iv[2] - iv[1]
                if self.record_intervals:
                    self.intervals.append((stage, *iv))
        if output is None:                             # a release-only message
            return self._finished([])
        self.trace.append(("complete", batch.batch_id))
        self.num_steps += 1
        now = self.clock.now()
        for request in output.scheduled:
            self.in_flight.pop(request.rid, None)
            if request.status != RequestStatus.RUNNING:
                continue                               # aborted (or failed) while in flight: its output is dropped
            if error is not None:
                self.fail(request, RuntimeError(error))
                continue
            request.num_computed_tokens += output.num_scheduled_tokens[request.rid]
            if request.rid in logits:
                self._append(request, logits[request.rid], now)
        return self._finished([r for r in output.scheduled if r.done and r.status == RequestStatus.RUNNING])

    def stop(self) -> None:
        """Take back what is in flight (its output is dropped), then tell every stage to stop."""
        while self.batch_queue:
            self._complete()
        self.executor.launch(PipelineBatch(self._next_id(), stop=True))
        self.executor.stop()


def both_busy_seconds(intervals) -> tuple[float, float]:
    """(seconds during which at least two stages computed at once, seconds during which any stage computed), from
    (stage, batch, start, end) intervals."""
    events = sorted([(start, 1, stage) for stage, _, start, _ in intervals] +
                    [(end, -1, stage) for stage, _, _, end in intervals])
    active: dict = {}
    both = anyone = 0.0
    last = None
    for t, delta, stage in events:
        if last is not None:
            busy = sum(1 for v in active.values() if v > 0)
            if busy >= 2:
                both += t - last
            if busy >= 1:
                anyone += t - last
        active[stage] = active.get(stage, 0) + delta
        last = t
    return both, anyone


def modelled_pipeline(trace, pp: int, cost=None) -> dict:
    """Replay a PipelineEngine's trace on modelled time: each stage holds 1/pp of the layers, so it computes a batch
    in step_seconds(decodes, prefill) / pp (clock.py: chapter 6's DeviceCost); the scheduler is the first stage's
    rank, so it launches a batch when it is done with its previous stage-0 work and with the results it waited
    for, in the order the run did. Returns {"seconds": makespan, "busy": per-stage busy seconds, "both": seconds
    during which two or more stages computed}."""
    driver, free, ends, intervals = 0.0, [0.0] * pp, {}, []
    for event in trace:
        if event[0] == "launch":
            _, batch_id, decodes, prefill = event
            cost_s = step_seconds(decodes, prefill, cost) / pp
            t = max(driver, free[0])
            for stage in range(pp):
                t = max(t, free[stage])
                intervals.append((stage, batch_id, t, t + cost_s))
                t = free[stage] = t + cost_s
                if stage == 0:
                    driver = t
            ends[batch_id] = t
        else:
            driver = max(driver, ends[event[1]])
    busy = [sum(end - start for s, _, start, end in intervals if s == stage) for stage in range(pp)]
    return {"seconds": driver, "busy": busy, "both": both_busy_seconds(intervals)[0]}
