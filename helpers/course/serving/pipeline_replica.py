"""A pipeline-parallel replica (pp > 1, optionally × tp): the tiny Llama cut into stages on real ranks —
not an exercise, code to read (chapter 6). It reuses, through `load_impl` (COURSE_IMPL's package):

    chapter 3  helpers.course.llama_stages.LlamaStage           the stage's layers and its own KV caches
               pipelined_decoding.pipelined_generate      several request groups in flight, ring of ranks
    chapter 5  hybrid.build_hybrid_stage (tp > 1 only)    each stage's layers sharded over its tp ranks

The replica process launches pp × tp ranks laid out like chapter 5's grid with dp = 1
(rank = stage · tp + t). Rank 0 (stage 0, tp rank 0) reads the front end's pipe and broadcasts what arrived,
so every rank keeps the same queue. Then all ranks serve one *round*: up to max_num_seqs waiting requests, each
its own group of `pipelined_generate`, so while stage 1 computes request 0's next token, stage 0 computes
request 1's. The round decodes max(max_tokens) steps and each request keeps its first max_tokens tokens.

What a pipeline changes for serving, compared with the one-process engine (helpers/course/engine):
  * rounds, not continuous batching: a request that arrives during a round joins the next one (chapter 3's
    `pipelined_generate` takes a fixed set of groups; vLLM's pipeline scheduler admits new sequences
    between micro-batches instead). batching="none" serves one request per round.
  * greedy only: the last stage sends back argmax tokens. The front end answers temperature > 0 with 400.
  * a cancelled request leaves the queue, but not a round already running.
  * a round is one long call: rank 0 reports its heartbeat from a thread meanwhile (`Heartbeat`), but
    only while the round makes progress (rank 0's timeline gains spans), so the front end can tell a long
    round from a stopped stage.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque

from helpers.course.serving.config import HEARTBEAT, ServeConfig
from helpers.course.serving.replica import STATS_EVERY, load_model_module


class Heartbeat:
    """`with Heartbeat(conn, stats, progress):` sends ("stats", stats()) every HEARTBEAT seconds from a
    thread while the block runs (a long pipeline round), as long as progress() has grown since the last
    beat: a round stuck on a stopped stage falls silent, and the front end's watchdog notices. (While
    progress() is still 0 it beats regardless: an implementation may record nothing.) Nothing else sends
    on conn meanwhile, so no lock is needed."""

    def __init__(self, conn, stats, progress=lambda: 0):
        self.conn, self.stats, self.progress, self.stop = conn, stats, progress, threading.Event()
        self.thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def _beat(self):
        seen = 0
        while not self.stop.wait(HEARTBEAT):
            now = self.progress()
            if now and now == seen:
                continue  # no step since the last beat: stay silent
            seen = now
            try:
                self.conn.send(("stats", self.stats()))
            except OSError:
                return

    def __enter__(self):
        if self.conn is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


def build_pipeline_stage(model, pp: int, tp: int):
    """This rank's (stage, stage_ranks, group) for `pipelined_generate`, in a job of pp × tp ranks."""
    import torch.distributed as dist

    from helpers import load_impl
    from helpers.course.llama_stages import LlamaStage
    if tp == 1:
        return LlamaStage(model, dist.get_rank(), pp), list(range(pp)), None
    stage, grid = load_impl("hybrid").build_hybrid_stage(model, 1, pp, tp)
    return stage.module, grid.ranks["pp"], grid.groups["pp"]


def pipeline_rank(rank, world_size, conn, config: ServeConfig):
    """Body of one rank of a pipeline replica (launched by replica_main with world_size = pp · tp; config: the
    server's ServeConfig)."""
    import torch
    import torch.distributed as dist

    from helpers import load_impl
    from helpers.course.engine import Request
    from helpers.timeline import Timeline
    torch.set_num_threads(1)
    conn = conn if rank == 0 else None   # only rank 0 (stage 0, tp rank 0) talks to the front end
    model = load_model_module(config.model).load_model().eval()
    stage, stage_ranks, group = build_pipeline_stage(model, config.pipeline_parallel_size, config.tensor_parallel_size)
    generate = load_impl("pipelined_decoding").pipelined_generate
    per_round = 1 if config.batching == "none" else config.max_num_seqs
    clock = time.monotonic() - time.perf_counter()   # Timeline's perf_counter -> Request's monotonic

    waiting: deque = deque()
    busy = 0.0
    rounds = tokens = 0
    last_stats = 0.0
    if conn is not None:
        conn.send(("ready", os.getpid()))
    try:
        while True:
            messages = []
            if conn is not None:
                timeout = 0 if waiting else HEARTBEAT   # idle: wake to report, and so the broadcast never times out
                try:
                    while conn.poll(timeout):
                        messages.append(conn.recv())
                        timeout = 0
                except (EOFError, OSError):
                    messages.append(("stop",))
            box = [messages]
            dist.broadcast_object_list(box, src=0)
            for msg in box[0]:
                if msg[0] == "submit":
                    _, rid, p = msg
                    waiting.append(Request(rid, p["prompt"], p["max_tokens"]))   # greedy
                elif msg[0] == "cancel":
                    for seq in [s for s in waiting if s.rid == msg[1]]:
                        waiting.remove(seq)
                    if conn is not None:   # rounds run whole: a request not waiting was already answered
                        conn.send(("cancelled", msg[1]))
                elif msg[0] == "stop":
                    return
            batch = [waiting.popleft() for _ in range(min(per_round, len(waiting)))]
            if batch:
                start = time.perf_counter()
                for seq in batch:
                    seq.started = time.monotonic()
                timeline = Timeline(rank) if conn is not None else None
                stats = {"busy_seconds": busy, "waiting": len(waiting), "running": len(batch), "steps": rounds,
                         "tokens": tokens}
                with Heartbeat(conn, lambda: stats, lambda: len(timeline.events) if timeline else 0):
                    out = generate(stage, stage_ranks, [torch.tensor([s.prompt]) for s in batch],
                                   max(s.max_tokens for s in batch), group=group, timeline=timeline)
                busy += time.perf_counter() - start
                rounds += 1
                tokens += sum(s.max_tokens for s in batch)
                if conn is not None:
                    now = time.monotonic()
                    for g, seq in enumerate(batch):
                        seq.tokens = out[g][0, len(seq.prompt):len(seq.prompt) + seq.max_tokens].tolist()
                        # the first token is back at stage 0 when it starts the group's first decode step
                        decodes = [e["start"] for e in timeline.events if e["label"] == "decode"
                                   and e["micro_batch"] == g]
                        seq.token_times = [min(decodes) + clock if decodes else now]
                        seq.finished = now
                        conn.send(("done", seq.rid, seq.tokens, seq.timings()))
            if conn is None:
                continue
            now = time.monotonic()
            if batch or now - last_stats > (STATS_EVERY if waiting else HEARTBEAT * 0.8):
                conn.send(("stats", {"busy_seconds": busy, "waiting": len(waiting), "running": 0,
                                     "steps": rounds, "tokens": tokens}))
                last_stats = now
    except (BrokenPipeError, ConnectionResetError):
        return
