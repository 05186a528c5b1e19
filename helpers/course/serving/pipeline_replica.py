"""A pipeline-parallel replica (pp > 1, optionally × tp): the course's engine on the tiny Llama cut into stages on
real ranks — not an exercise, code to read (chapter 6).

The replica process launches pp × tp ranks laid out like chapter 5's grid with dp = 1 (rank = stage · tp + t).

    rank 0 (stage 0, tp rank 0)   the engine: helpers/course/engine's Scheduler, KVCacheManager, Request, driven by
                                  helpers/course/engine/pipeline_runner.py's PipelineEngine (vLLM's
                                  step_with_batch_queue: up to pp batches in flight); it reads the front end's
                                  pipe, computes stage 0 and samples what the last stage sends back
    every rank                    a PipelineStageRunner: its stage's layers (chapter 3's LlamaStage; with tp > 1
                                  chapter 5's build_hybrid_stage shards them) and those layers' KV cache,
                                  contiguous or paged as the ServeConfig says
    between stages                the batch's plan and hidden states, rank (s, t) -> rank (s+1, t) with isend/recv
                                  (gloo); the last stage's tp rank 0 sends the due requests' logits to rank 0; a
                                  stage's tp ranks > 0 get stage 0's plan by broadcast over their tp group

While stage 1 computes batch b, stage 0 computes batch b+1: a request that arrives while a batch is in flight
joins the next one, so under load both stages hold work (the replica's "stats" report it: `pipeline`). A request
is in at most one batch in flight, so it decodes one token per trip through the pipeline, as in vLLM.

Messages are replica.py's: ("ready"), ("tokens", rid, new ids, logprobs) after each batch that gave a request
tokens, ("done"), ("failed"), ("cancelled"), ("stats"). A cancel aborts the request at once on rank 0 (its KV blocks
go back to the pool, which every stage's pool mirrors) and the next message down the pipeline tells every stage to
drop the request's cache; a batch already in flight finishes and its output for the request is dropped. Sampling
happens on rank 0 with the request's own generator, so seeded samples equal the single-process engine's.
"""
from __future__ import annotations

import os
import pickle
import random
import sys
import time
import traceback

from helpers.course.serving.config import HEARTBEAT, ServeConfig
from helpers.course.serving.replica import STATS_EVERY, load_model_module, send_tokens



class Link:
    """Point-to-point messages between ranks: any picklable object, sent with isend (the sender goes on with its
    next batch while the receiver is busy) and received with a blocking recv. Two sends per message: its size,
    then its bytes (gloo keeps the order between two ranks)."""

    def __init__(self):
        self.pending: list = []

    def send(self, dst: int, obj) -> None:
        import torch
        import torch.distributed as dist
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        self.pending = [(w, t) for w, t in self.pending if not w.is_completed()]
        self.pending += [(dist.isend(size, dst), size), (dist.isend(data, dst), data)]   # keep the buffers alive

    def recv(self, src: int):
        import torch
        import torch.distributed as dist
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src)
        data = torch.empty(int(size), dtype=torch.uint8)
        dist.recv(data, src)
        return pickle.loads(data.numpy().tobytes())

    def wait(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending = []


class DistributedPipeline:
    """Rank 0's executor for PipelineEngine: launch() computes stage 0 and sends the batch on; result() waits for
    the last stage's answer (batch_id, {rid: logits}, trail, error)."""

    def __init__(self, runner, link: Link, tp: int, pp: int, tp_group=None):
        self.runner, self.link, self.tp_group = runner, link, tp_group
        self.next_rank, self.last_rank = tp, (pp - 1) * tp

    def launch(self, batch) -> None:
        if self.tp_group is not None:
            import torch.distributed as dist
            dist.broadcast_object_list([batch], src=0, group=self.tp_group)
        x, error = None, None
        if not batch.stop:
            try:
                x = self.runner.run(batch, None)
            except Exception as e:
                traceback.print_exc()
                error = f"{type(e).__name__}: {e}"
        self.link.send(self.next_rank, (batch, x, [self.runner.trail(0)], error))

    def result(self):
        return self.link.recv(self.last_rank)

    def stop(self) -> None:
        self.link.wait()


def build_stage(model, pp: int, tp: int):
    """This rank's (LlamaStage, tp group or None), in a job of pp × tp ranks (rank = stage · tp + t)."""
    import torch.distributed as dist

    from helpers import load_impl
    from helpers.course.llama_stages import LlamaStage
    if tp == 1:
        return LlamaStage(model, dist.get_rank(), pp), None
    stage, grid = load_impl("hybrid").build_hybrid_stage(model, 1, pp, tp)
    return stage.module, grid.groups["tp"]


def pipeline_rank(rank, world_size, conn, config: ServeConfig):
    """Body of one rank of a pipeline replica (launched by replica_main with world_size = pp · tp; config: the
    server's ServeConfig)."""
    import torch

    from helpers.course.engine.pipeline_runner import PipelineStageRunner
    torch.set_num_threads(1)
    pp, tp = config.pipeline_parallel_size, config.tensor_parallel_size
    model = load_model_module(config.model).load_model().eval()
    module, tp_group = build_stage(model, pp, tp)
    runner = PipelineStageRunner(module, config.kv_cache, config.num_gpu_blocks_override, config.block_size)
    link = Link()
    import torch.distributed as dist
    ranks = [None] * world_size
    dist.all_gather_object(ranks, os.getpid())   # every rank's process, rank 0 first: the front end's /replicas
    if rank == 0:
        _serve(conn, _build_engine(model, config, DistributedPipeline(runner, link, tp, pp, tp_group)), ranks)
    else:
        _stage_loop(runner, link, rank, tp, pp, tp_group)
    link.wait()


def _build_engine(model, config: ServeConfig, executor, max_concurrent_batches: int | None = None):
    from helpers.course.engine.pipeline_runner import PipelineEngine
    scheduler = config.scheduler_config(model.config)
    return PipelineEngine.build(executor, config.kv_cache, config.num_gpu_blocks_override, config.block_size,
                                config.enable_prefix_caching, scheduler, batching=config.batching,
                                max_concurrent_batches=max_concurrent_batches or config.pipeline_parallel_size)


def _stage_loop(runner, link: Link, rank: int, tp: int, pp: int, tp_group) -> None:
    """Every rank but 0: take a batch (stage 0's tp ranks by broadcast from rank 0, the others from the same tp rank
    of the previous stage), compute it, pass it on; the last stage's tp rank 0 answers rank 0."""
    import torch.distributed as dist
    stage, t = divmod(rank, tp)
    last = stage == pp - 1
    while True:
        if stage == 0:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=tp_group)
            batch, x, trail, error = box[0], None, [], None
        else:
            batch, x, trail, error = link.recv(rank - tp)
        if batch.stop:
            if not last:
                link.send(rank + tp, (batch, None, [], None))
            return
        if error is None:
            try:
                x = runner.run(batch, x)
            except Exception as e:    # the batch's requests fail (rank 0 answers them); the pipeline goes on
                traceback.print_exc()
                x, error = None, f"stage {stage}: {type(e).__name__}: {e}"
        else:
            runner.release(batch.release)
            runner.last_interval = None
        trail = trail + [runner.trail(stage)]
        if not last:
            link.send(rank + tp, (batch, x, trail, error))
        elif t == 0:
            link.send(0, (batch.batch_id, x if error is None else {}, trail, error))


def pipeline_stats(engine) -> dict:
    """The replica's load report, with what shows the pipeline pipelining: batches launched while another was in
    flight, each stage's compute seconds, and over the latest intervals the seconds two stages computed at once."""
    from helpers.course.engine.pipeline_runner import both_busy_seconds
    both, anyone = both_busy_seconds(engine.intervals)
    return {"busy_seconds": engine.busy_seconds, "waiting": len(engine.waiting), "running": len(engine.running),
            "steps": engine.num_steps, "tokens": engine.tokens_generated, **engine.kv_stats(),
            "pipeline": {"batches": engine.num_steps, "overlapped_launches": engine.overlapped_launches,
                         "in_flight": len(engine.batch_queue), "stage_requests": list(engine.stage_requests),
                         "stage_busy_seconds": [engine.stage_busy.get(s, 0.0) for s in sorted(engine.stage_busy)],
                         "both_busy_seconds": both, "any_busy_seconds": anyone}}


def _serve(conn, engine, ranks: list) -> None:
    """Rank 0's loop: replica.py's, on a PipelineEngine (each step launches a batch or takes one back)."""
    from helpers.course.engine import Request
    conn.send(("ready", os.getpid(), ranks))
    last_stats = 0.0
    live = {}   # rid -> [Request, tokens sent]
    try:
        while True:
            messages = []
            timeout = 0 if engine.has_unfinished else HEARTBEAT
            try:
                while conn.poll(timeout):
                    messages.append(conn.recv())
                    timeout = 0
            except (EOFError, OSError):
                messages.append(("stop",))
            failed = []
            for msg in messages:
                if msg[0] == "submit":
                    _, rid, p = msg
                    try:
                        seed = p.get("seed")
                        if p.get("temperature", 0) > 0 and seed is None:
                            seed = random.getrandbits(63)
                        options = {"logprobs": p["logprobs"]} if p.get("logprobs") is not None else {}
                        request = Request(rid, p["prompt"], p["max_tokens"], p.get("temperature", 0.0),
                                          p.get("top_p", 1.0), seed, **options)
                        live[rid] = [request, 0]
                        engine.add_request(request)
                    except (ValueError, TypeError, KeyError) as e:
                        live.pop(rid, None)
                        failed.append((rid, 400, f"invalid request: {type(e).__name__}: {e}"))
                elif msg[0] == "cancel":
                    live.pop(msg[1], None)
                    engine.abort(msg[1])
                    conn.send(("cancelled", msg[1]))
                elif msg[0] == "stop":
                    engine.stop()
                    return
            try:
                finished = engine.step() if engine.has_unfinished else []
            except Exception as e:
                if engine.broken:      # a send or receive failed: the stages are out of step; the replica dies
                    raise              # and the front end retries its requests (a scheduling error is not that)
                finished = []
                traceback.print_exc()
                for request in [*engine.running, *engine.waiting]:
                    engine.fail(request, e)
            for seq in engine.take_failed():
                live.pop(seq.rid, None)
                print(f"replica {os.getpid()}: request {seq.rid} failed: {seq.error}", file=sys.stderr, flush=True)
                failed.append((seq.rid, 500, f"the engine failed on this request: {seq.error}"))
            for rid, status, message in failed:
                conn.send(("failed", rid, status, message))
            send_tokens(conn, live, finished)
            now = time.monotonic()
            if finished or failed or now - last_stats > (STATS_EVERY if engine.has_unfinished else HEARTBEAT * 0.8):
                conn.send(("stats", pipeline_stats(engine)))
                last_stats = now
    except (BrokenPipeError, ConnectionResetError):
        engine.stop()
        return


def _measure_rank(rank, world_size, config: ServeConfig, num_requests: int, max_tokens: int):
    """One rank of `python -m helpers.course.serving.pipeline_replica`: the same load with 1 and with pp batches in
    flight; rank 0 returns the figures."""
    import torch

    from helpers.course.engine import Request
    from helpers.course.engine.pipeline_runner import PipelineStageRunner, both_busy_seconds, modelled_pipeline
    torch.set_num_threads(1)
    pp, tp = config.pipeline_parallel_size, config.tensor_parallel_size
    module = load_model_module(config.model)
    model = module.load_model().eval()
    stage, tp_group = build_stage(model, pp, tp)
    runner = PipelineStageRunner(stage, config.kv_cache, config.num_gpu_blocks_override, config.block_size)
    link = Link()
    if rank != 0:
        _stage_loop(runner, link, rank, tp, pp, tp_group)
        link.wait()
        return None
    executor = DistributedPipeline(runner, link, tp, pp, tp_group)
    figures = {}
    for depth in (1, pp, 1, pp):                     # twice each, interleaved: the machine's load drifts
        engine = _build_engine(model, config, executor, max_concurrent_batches=depth)
        requests = [Request(i, module.encode(f"Request {i} says"), max_tokens) for i in range(num_requests)]
        for request in requests:
            engine.add_request(request)
        start = time.perf_counter()
        while engine.has_unfinished:
            engine.step()
        seconds = time.perf_counter() - start
        both, anyone = both_busy_seconds(engine.intervals)
        replay = modelled_pipeline(engine.trace, pp)
        tokens = sum(len(r.tokens) for r in requests)
        figures.setdefault(depth, []).append({
            "batches": engine.num_steps, "overlapped_launches": engine.overlapped_launches,
            "wall_tokens_per_s": tokens / seconds, "both_busy_fraction": both / anyone if anyone else 0.0,
            "modelled_tokens_per_s": tokens / replay["seconds"],
            "modelled_both_busy_fraction": replay["both"] / replay["seconds"]})
    engine.stop()
    link.wait()
    return figures


def main(argv=None) -> None:
    """Print the pipeline's figures: one batch in flight vs pp, on the same load, measured and modelled."""
    import argparse

    from helpers.launch import launch
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--kv-cache", default="contiguous", choices=("contiguous", "paged"))
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    config = ServeConfig(pipeline_parallel_size=args.pp, tensor_parallel_size=args.tp, data_parallel_size=1,
                         max_num_seqs=max(8, args.requests))
    if args.kv_cache == "paged":            # ServeConfig refuses paged with pp > 1 today (see h6_needs)
        object.__setattr__(config, "kv_cache", "paged")
    figures = launch(_measure_rank, args.pp * args.tp, config, args.requests, args.max_tokens, backend="gloo",
                     show_output=False, timeout=300)[0]
    print(f"pp={args.pp} tp={args.tp} kv_cache={args.kv_cache}: {args.requests} requests × {args.max_tokens} tokens, "
          "all at once (two runs each)")
    for depth, runs in figures.items():
        for run in runs:
            print(f"  {depth} batch(es) in flight: {run['batches']:3d} batches, "
                  f"{run['overlapped_launches']:3d} launched while another was in flight; "
                  f"wall {run['wall_tokens_per_s']:6.0f} tok/s, 2+ stages computing "
                  f"{run['both_busy_fraction']:5.1%} of the compute time | modelled "
                  f"{run['modelled_tokens_per_s']:6.0f} tok/s, 2+ stages busy "
                  f"{run['modelled_both_busy_fraction']:5.1%}")


if __name__ == "__main__":
    main()
