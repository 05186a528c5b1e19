"""A replica: one worker process that owns a copy of the model and an Engine, and talks to the front end
over a pipe. Data parallelism for serving is exactly this: N independent copies, each with its own batch.

Messages (tuples, pickled by multiprocessing.Connection):
    front end -> replica   ("submit", rid, {prompt, max_tokens, temperature, top_p, seed})
                           ("cancel", rid)           the client went away: stop computing it
    replica -> front end   ("ready", pid)            model loaded, accepting work
                           ("done", rid, tokens, timings)
                           ("stats", {busy_seconds, waiting, running, steps, tokens})

The loop blocks on the pipe while idle and polls it between decode steps while busy, so new requests join
the batch at the next step (continuous batching) without a thread. It exits when the pipe closes (the
front end stopped or died) and, on Linux, when its parent process dies.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import signal
import stat
import sys
import time

STATS_EVERY = 0.05  # seconds between load reports while busy


def load_model_module(spec: str):
    """`spec` names a module with load_model(), encode(), decode() and CONFIG, e.g. helpers.tiny_llama."""
    return importlib.import_module(spec)


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


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


def replica_main(conn, index: int, model_spec: str, batching: str, max_batch: int, threads: int = 1) -> None:
    """Body of replica process `index`: load the model, then serve the pipe until it closes."""
    _die_with_parent()
    close_inherited_sockets(keep=conn.fileno())
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C goes to the front end, which stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import torch

    from helpers.serving.engine import Engine, Sequence
    torch.set_num_threads(threads)
    model = load_model_module(model_spec).load_model().eval()
    engine = Engine(model, max_batch=max_batch, batching=batching)
    conn.send(("ready", os.getpid()))
    last_stats = 0.0
    try:
        while True:
            # Idle: sleep on the pipe. Busy: take whatever arrived, then run the next step.
            timeout = 0 if engine.has_work else None
            while conn.poll(timeout):
                msg = conn.recv()
                if msg[0] == "submit":
                    _, rid, p = msg
                    engine.submit(Sequence(rid, p["prompt"], p["max_tokens"], p.get("temperature", 0.0),
                                           p.get("top_p", 1.0), p.get("seed")))
                elif msg[0] == "cancel":
                    engine.cancel(msg[1])
                timeout = 0
            finished = engine.step() if engine.has_work else []
            for seq in finished:
                conn.send(("done", seq.rid, seq.tokens, seq.timings()))
            now = time.monotonic()
            if finished or now - last_stats > STATS_EVERY or not engine.has_work:
                conn.send(("stats", {"busy_seconds": engine.busy_seconds, "waiting": len(engine.waiting),
                                     "running": len(engine.running), "steps": engine.steps,
                                     "tokens": engine.tokens_generated}))
                last_stats = now
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the front end is gone
