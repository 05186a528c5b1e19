"""A replica: one worker process that owns a copy of the model and an engine, and talks to the front end
over a pipe. Data parallelism for serving is exactly this: N independent copies, each with its own batch.

Messages (tuples, pickled by multiprocessing.Connection):
    front end -> replica   ("submit", rid, {prompt, max_tokens, temperature, top_p, seed})
                           ("cancel", rid)           the client went away: stop computing it
    replica -> front end   ("ready", pid)            model loaded, accepting work
                           ("done", rid, tokens, timings)
                           ("failed", rid, status, message)   this request failed here (400: it was
                                                     invalid, 500: it hit a bug); the replica carries on
                           ("cancelled", rid)        the cancel was handled: the replica holds rid no more
                           ("stats", {busy_seconds, waiting, running, steps, tokens})   also the heartbeat

The loop waits on the pipe while idle and polls it between decode steps while busy, so new requests join
the batch at the next step (continuous batching) without a thread. It reports its load at least every
HEARTBEAT seconds, idle or busy: the front end takes a replica that falls silent for longer than its
`stuck_after` as stuck (stopped, hung), kills it and retries its requests elsewhere. It exits when the pipe
closes (the front end stopped or died) and, on Linux, when its parent process dies.
"""
from __future__ import annotations

import importlib
import os
import random
import signal
import stat
import sys
import time
import traceback

from helpers.launch import die_with_parent

STATS_EVERY = 0.05  # seconds between load reports while busy
HEARTBEAT = 0.5     # seconds between load reports while idle: the front end's sign of life


def load_model_module(spec: str):
    """`spec` names a module with load_model(), encode(), decode() and CONFIG, e.g. helpers.course.tiny_llama."""
    return importlib.import_module(spec)


def close_inherited_sockets(keep: int) -> None:
    """A forked child inherits every socket of the front end: the listening socket, the other replicas'
    pipes and every client connection open at that moment. A client reads its response until the server
    closes the connection, which does not happen while a copy of the socket lives on in a replica, so
    close them all (on Linux, /proc/self/fd lists them); keep only our own pipe."""
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd > 2 and fd != keep:
            try:
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    os.close(fd)
            except OSError:
                pass


def replica_main(conn, index: int, model_spec: str, batching: str, max_batch: int, threads: int = 1,
                 tp: int = 1, pp: int = 1, kv: dict | None = None) -> None:
    """Body of replica process `index`: load the model, then serve the pipe until it closes.

    tp > 1: the replica is itself a distributed job. This process launches `tp` ranks (helpers.launch);
    each shards the model with chapter 2's `shard_llama` and runs an identical engine in lockstep. Rank 0
    reads the pipe and broadcasts what arrived to the other ranks before every step, so all ranks make the
    same scheduling decisions and call the model with the same batch; the all-reduces inside the sharded
    model then pair up. Only rank 0 answers the front end.

    pp > 1: the replica is a pipeline of pp stages of tp ranks each (helpers/course/serving/pipeline_replica.py:
    chapter 3's `pipelined_generate` over `LlamaStage`s, chapter 5's `build_hybrid_stage` when tp > 1).

    kv: None keeps chapter 6's contiguous cache; a dict (num_blocks, block_size, prefix_caching, token_budget)
    serves from chapter 7's paged KV cache (`build_engine`; pp = 1). With tp > 1 each rank's pool holds its own
    KV heads and every rank runs the same scheduler decisions and block tables in lockstep: SGLang's design (a
    scheduler per TP rank, kept in step by determinism); vLLM instead runs one scheduler and broadcasts its
    output to the workers."""
    die_with_parent()
    close_inherited_sockets(keep=conn.fileno())
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C goes to the front end, which stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from helpers.launch import launch
    if pp > 1:
        from helpers.course.serving.pipeline_replica import pipeline_rank
        launch(pipeline_rank, pp * tp, conn, model_spec, batching, max_batch, pp, tp, timeout=10**7,
               threads=threads, show_output=False, backend="gloo")
        return
    if tp == 1:
        _serve(conn, _build_engine(model_spec, batching, max_batch, threads, kv=kv), group_size=1)
        return
    # The replica lives as long as the server: no job timeout worth speaking of.
    launch(_tp_rank, tp, conn, model_spec, batching, max_batch, kv, timeout=10**7, threads=threads,
           show_output=False, backend="gloo")


def build_engine(model, batching: str = "continuous", max_batch: int = 8, kv: dict | None = None):
    """The replica's engine (helpers/course/engine): chapter 6's contiguous cache, or with `kv` chapter 7's paged
    cache — kv = {num_blocks, block_size, prefix_caching, token_budget}: token_budget None computes whole prompts
    (a budget every prompt fits), N is vLLM's --max-num-batched-tokens."""
    from helpers.course.engine import LLMEngine, SchedulerConfig
    longest = model.config.max_position_embeddings
    if not kv:
        config = SchedulerConfig(max_num_batched_tokens=max_batch * longest, max_num_seqs=max_batch)
        return LLMEngine.contiguous(model, config=config, batching=batching, record_steps=False)
    budget = kv.get("token_budget") or max_batch * longest
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_batch)
    return LLMEngine.paged(model, num_blocks=kv["num_blocks"], block_size=kv["block_size"],
                           enable_prefix_caching=kv.get("prefix_caching", False), config=config, batching=batching,
                           record_steps=False)


def _build_engine(model_spec, batching, max_batch, threads, shard=None, kv=None):
    import torch
    torch.set_num_threads(threads)
    model = load_model_module(model_spec).load_model().eval()
    if shard is not None:
        shard(model)
    return build_engine(model, batching, max_batch, kv)


def _tp_rank(rank, world_size, conn, model_spec, batching, max_batch, kv=None):
    from helpers import load_impl
    engine = _build_engine(model_spec, batching, max_batch, threads=1, shard=load_impl("tp_llama").shard_llama,
                           kv=kv)
    _serve(conn if rank == 0 else None, engine, group_size=world_size)


def _serve(conn, engine, group_size: int) -> None:
    """The replica loop. conn is None on the ranks > 0 of a tensor-parallel replica."""
    import torch.distributed as dist

    from helpers.course.engine import Request
    if conn is not None:
        conn.send(("ready", os.getpid()))
    last_stats = 0.0
    try:
        while True:
            messages = []
            if conn is not None:
                # Idle: sleep on the pipe, waking every HEARTBEAT to report (and so that the other ranks'
                # broadcast never times out). Busy: take whatever arrived, then run the next step.
                timeout = 0 if engine.has_unfinished else HEARTBEAT
                try:
                    while conn.poll(timeout):
                        msg = conn.recv()
                        if msg[0] == "submit" and msg[2].get("temperature", 0) > 0 and msg[2].get("seed") is None:
                            msg[2]["seed"] = random.getrandbits(63)  # the same draw on every rank
                        messages.append(msg)
                        timeout = 0
                except (EOFError, OSError):
                    messages.append(("stop",))
            if group_size > 1:
                box = [messages]
                dist.broadcast_object_list(box, src=0)
                messages = box[0]
            failed = []   # (rid, HTTP status, message): requests that fail here, and only them
            for msg in messages:
                if msg[0] == "submit":
                    _, rid, p = msg
                    try:
                        engine.add_request(Request(rid, p["prompt"], p["max_tokens"], p.get("temperature", 0.0),
                                                   p.get("top_p", 1.0), p.get("seed")))
                    except (ValueError, TypeError, KeyError) as e:
                        failed.append((rid, 400, f"invalid request: {type(e).__name__}: {e}"))
                elif msg[0] == "cancel":
                    engine.abort(msg[1])
                    if conn is not None:
                        conn.send(("cancelled", msg[1]))
                elif msg[0] == "stop":
                    return  # the front end is gone
            try:
                finished = engine.step() if engine.has_unfinished else []
            except Exception as e:  # a bug outside any one request: fail the batch, keep the replica
                finished = []
                traceback.print_exc()
                for request in [*engine.running, *engine.waiting]:
                    engine.fail(request, e)
            for seq in engine.take_failed():
                if conn is not None:
                    print(f"replica {os.getpid()}: request {seq.rid} failed:\n{seq.traceback}",
                          file=sys.stderr, flush=True)
                failed.append((seq.rid, 500, f"the engine failed on this request: {seq.error}"))
            if conn is None:
                continue
            for rid, status, message in failed:
                conn.send(("failed", rid, status, message))
            for seq in finished:
                conn.send(("done", seq.rid, seq.tokens, seq.timings()))
            now = time.monotonic()
            if finished or failed or now - last_stats > (STATS_EVERY if engine.has_unfinished else HEARTBEAT * 0.8):
                conn.send(("stats", {"busy_seconds": engine.busy_seconds, "waiting": len(engine.waiting),
                                     "running": len(engine.running), "steps": engine.num_steps,
                                     "tokens": engine.tokens_generated, **engine.kv_stats()}))
                last_stats = now
    except (BrokenPipeError, ConnectionResetError):
        return  # the front end is gone
