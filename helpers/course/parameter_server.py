"""Synchronous all-reduce SGD vs asynchronous SGD with a parameter server, as real processes.

The problem is chapter 4's small least-squares fit (the notebook's `sgd` simulation uses the same data):
A: [256, 8], b = A @ w_true, float64, fixed seed; worker k owns rows k*64 .. k*64+63.

    from helpers import launch
    from helpers.course.parameter_server import sync_sgd, async_sgd

    sync = launch(sync_sgd, 4, lr=0.05, steps=20, delays_ms=[5, 5, 5, 20])     # 4 peers
    run = launch(async_sgd, 5, lr=0.05, steps=20, delays_ms=[5, 5, 5, 20])[0]  # server on rank 0 + 4 workers

* `sync_sgd`: every rank computes the gradient of its shard, `dist.all_reduce` sums them, every rank divides
  by the world size and takes the same step. Nobody moves on until the slowest rank has sent its gradient.
* `async_sgd`: rank 0 is the parameter server. A worker pulls the weights (and their version), computes
  its gradient, pushes it back; the server applies each gradient the moment it arrives, from whichever
  worker sent it, and answers with the new weights. Nobody waits for anybody else — but a gradient computed
  from version v and applied at version u is `u - v` updates stale.

`delays_ms[k]` is a fixed sleep added to worker k's gradient, so one worker can be a straggler. Both
workers return `helpers.timeline` spans for a Gantt chart: "F" = computing a gradient, "comm" = inside a
send/recv or all-reduce (including the time spent waiting for others), "W" = the server applying an update.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from helpers.timeline import Timeline

ROWS, FEATURES, WORKERS = 256, 8, 4


def least_squares_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A: [256, 8], b: [256], float64 — the same data as the notebook's `sgd(staleness)` simulation."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(ROWS, FEATURES, generator=g, dtype=torch.float64)
    w_true = torch.randn(FEATURES, generator=g, dtype=torch.float64)
    return A, A @ w_true


def shard(A: torch.Tensor, b: torch.Tensor, worker: int, workers: int = WORKERS):
    """Worker `worker`'s contiguous block of rows (A.chunk, as in the simulation)."""
    return A.chunk(workers)[worker], b.chunk(workers)[worker]


def gradient(A_k: torch.Tensor, b_k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Gradient of the mean squared residual (halved) on one shard: A_k^T (A_k w - b_k) / rows."""
    return A_k.T @ (A_k @ w - b_k) / len(b_k)


def loss(A: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> float:
    return ((A @ w - b) ** 2).mean().item()


# --------------------------------------------------------------------------------- single-process references

def full_batch_sgd(lr: float, steps: int, workers: int = WORKERS, seed: int = 0):
    """What synchronous data parallelism must equal: each step averages every shard's gradient.
    Returns (w: [8], losses after each step)."""
    A, b = least_squares_problem(seed)
    w, losses = torch.zeros(FEATURES, dtype=torch.float64), []
    for _ in range(steps):
        grads = [gradient(*shard(A, b, k, workers), w) for k in range(workers)]
        w = w - lr * torch.stack(grads).sum(0) / workers
        losses.append(loss(A, b, w))
    return w, losses


def replay_async(schedule: list[tuple[int, int]], lr: float, workers: int = WORKERS, seed: int = 0):
    """Re-run an asynchronous run in one process from its recorded schedule [(worker, version pulled)]:
    update i applies worker's gradient at the weights of that version. Returns (w, losses)."""
    A, b = least_squares_problem(seed)
    versions = [torch.zeros(FEATURES, dtype=torch.float64)]
    losses = []
    for worker, pulled in schedule:
        w = versions[-1] - lr * gradient(*shard(A, b, worker, workers), versions[pulled])
        versions.append(w)
        losses.append(loss(A, b, w))
    return versions[-1], losses


# ------------------------------------------------------------------------------- synchronous: all-reduce peers

def sync_sgd(rank: int, world_size: int, lr: float = 0.05, steps: int = 30, delays_ms=None, seed: int = 0):
    """Synchronous data-parallel SGD on `world_size` peers. Returns {"w", "losses", "events"}."""
    A, b = least_squares_problem(seed)          # every rank builds the data; it uses only its shard
    A_k, b_k = shard(A, b, rank, world_size)
    delay = (delays_ms[rank] if delays_ms else 0) / 1e3
    tl, w, losses = Timeline(rank), torch.zeros(FEATURES, dtype=torch.float64), []
    dist.barrier()                              # start the clock together
    for step in range(steps):
        with tl.span("F", step=step):
            grad = gradient(A_k, b_k, w)
            time.sleep(delay)                   # a slower GPU, a busier host: the straggler
        with tl.span("comm", step=step):
            dist.all_reduce(grad)               # waits here for the slowest rank
        w = w - lr * grad / world_size
        losses.append(loss(A, b, w))            # for the curve only
    return {"w": w, "losses": losses, "events": tl.events}


# ------------------------------------------------------------------------ asynchronous: a parameter server

def async_sgd(rank: int, world_size: int, lr: float = 0.05, steps: int = 30, delays_ms=None, seed: int = 0):
    """Asynchronous SGD: rank 0 serves the weights, ranks 1.. are workers (worker k = rank k+1 owns shard k).

    Messages are one float64 tensor of 9 numbers: 8 weights (or gradient entries) then a version number.
    Rank 0 returns {"w", "losses", "staleness", "schedule", "events"}; workers return {"events"}.
    """
    workers = world_size - 1
    if workers < 1:
        raise ValueError(f"world_size={world_size}: async_sgd needs rank 0 as the server and at least one worker")
    A, b = least_squares_problem(seed)
    tl, msg = Timeline(rank), torch.zeros(FEATURES + 1, dtype=torch.float64)
    dist.barrier()
    if rank == 0:
        return server_loop(A, b, lr, steps * workers, workers, tl, msg)
    A_k, b_k = shard(A, b, rank - 1, workers)
    delay = (delays_ms[rank - 1] if delays_ms else 0) / 1e3
    with tl.span("comm", step=-1):
        dist.recv(msg, src=0)                   # first pull: weights at version 0
    for step in range(steps):
        w, version = msg[:FEATURES].clone(), msg[FEATURES].item()
        with tl.span("F", step=step):
            grad = gradient(A_k, b_k, w)
            time.sleep(delay)
        with tl.span("comm", step=step):
            dist.send(torch.cat([grad, torch.tensor([version], dtype=torch.float64)]), dst=0)   # push
            dist.recv(msg, src=0)               # pull the newest weights (only the server's reply)
    return {"events": tl.events}


def server_loop(A, b, lr, updates, workers, tl, msg):
    """The server loop: apply each pushed gradient at once, whoever sent it; reply with the new weights."""
    w, version = torch.zeros(FEATURES, dtype=torch.float64), 0
    losses, staleness, schedule = [], [], []
    for worker_rank in range(1, workers + 1):
        dist.send(torch.cat([w, torch.zeros(1, dtype=torch.float64)]), dst=worker_rank)
    for _ in range(updates):
        sender = dist.recv(msg)                 # no src: the first gradient to arrive, from any worker
        with tl.span("W", step=version):
            pulled = int(msg[FEATURES].item())
            w = w - lr * msg[:FEATURES]
            staleness.append(version - pulled)  # updates applied since this worker pulled its weights
            schedule.append((sender - 1, pulled))
            version += 1
            losses.append(loss(A, b, w))
        dist.send(torch.cat([w, torch.tensor([float(version)], dtype=torch.float64)]), dst=sender)
    return {"w": w, "losses": losses, "staleness": staleness, "schedule": schedule, "events": tl.events}
