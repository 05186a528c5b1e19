"""The plumbing of a pipeline on real ranks — not an exercise, code to read (chapter 3).

* `send_tensor` / `recv_tensor`: point-to-point transfer of an activation whose shape the receiver does not
  know yet (a small header with dtype and shape goes first, then the data). `send_tensor` uses `isend`,
  so a stage hands its output over and moves on to the next micro-batch instead of waiting for the next
  stage to be ready: that is what lets stages overlap.
* `stage_neighbours`: the global ranks before and after this rank in a list of stage ranks, so a pipeline
  can live on any ranks of a bigger grid (hybrid parallelism), not only on ranks 0..p-1.
* `SpinWork`: a stage's "device time" held fixed (see its docstring: why not real matmuls on 2 cores).
* `run_training_schedule`: executes one rank's list of F/B actions (from `helpers.schedule_sim` or your
  `pipeline_schedules.one_f_one_b_order`) with real forward and backward passes across ranks.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["send_tensor", "recv_tensor", "stage_neighbours", "busy_wait", "SpinWork", "run_training_schedule",
           "wait_all"]

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool]
_MAX_DIMS = 6


def send_tensor(tensor: torch.Tensor, dst: int, group=None) -> list:
    """Start sending `tensor` to global rank `dst`: header [dtype, ndim, *shape], then the data.

    Returns the `Work` handles; keep them (and so the tensors) alive until `wait_all(handles)`.
    """
    if tensor.dim() > _MAX_DIMS:
        raise ValueError(f"send_tensor handles at most {_MAX_DIMS} dimensions, got shape {tuple(tensor.shape)}")
    tensor = tensor.detach().contiguous()
    header = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64)
    header[0], header[1] = _DTYPES.index(tensor.dtype), tensor.dim()
    header[2:2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    works = [dist.isend(header, dst, group=group), dist.isend(tensor, dst, group=group)]
    works.append((header, tensor))  # keep both buffers alive until the sends complete
    return works


def recv_tensor(src: int, group=None) -> torch.Tensor:
    """Receive a tensor sent by `send_tensor` from global rank `src` (blocks until it arrives)."""
    header = torch.empty(2 + _MAX_DIMS, dtype=torch.int64)
    dist.recv(header, src, group=group)
    dtype, ndim = _DTYPES[int(header[0])], int(header[1])
    out = torch.empty(header[2:2 + ndim].tolist(), dtype=dtype)
    dist.recv(out, src, group=group)
    return out


def wait_all(handles: list) -> None:
    """Wait for every `Work` in a list returned by `send_tensor` (buffers in it are just dropped)."""
    for h in handles:
        if hasattr(h, "wait"):
            h.wait()
    handles.clear()


def stage_neighbours(stage_ranks: list[int], rank: int | None = None) -> tuple[int | None, int | None]:
    """(prev_rank, next_rank) of `rank` (default: this process) in a pipeline laid out on `stage_ranks`,
    global ranks in stage order; None at the ends. E.g. stage_ranks=[1, 3, 5], rank 3 -> (1, 5)."""
    rank = dist.get_rank() if rank is None else rank
    if rank not in stage_ranks:
        raise ValueError(f"rank {rank} is not one of the pipeline's stage ranks {stage_ranks}")
    i = stage_ranks.index(rank)
    return (stage_ranks[i - 1] if i > 0 else None), (stage_ranks[i + 1] if i + 1 < len(stage_ranks) else None)


def busy_wait(seconds: float) -> None:
    """Keep this process busy (not asleep) until `seconds` of wall time have passed."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class _Spin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward_s, backward_s):
        ctx.backward_s = backward_s
        busy_wait(forward_s)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        busy_wait(ctx.backward_s)
        return grad, None, None


class SpinWork(nn.Module):
    """Identity whose forward (and backward) hold the rank busy for a fixed wall time.

    Why: a stage of a real pipeline owns its device. Here 4 ranks share 2 CPU cores (and other jobs), so
    when 4 stages run real matmuls at once each gets about half a core and its work takes twice as long as
    when it runs alone: the measured timeline no longer has the shape the pipeline theory describes. A
    busy wait of fixed *wall* time takes the same time however many ranks run at once, like a kernel on
    its own accelerator, so measured bubbles can be compared with (p-1)/(m+p-1).
    """

    def __init__(self, forward_ms: float, backward_ms: float = 0.0):
        super().__init__()
        self.forward_ms, self.backward_ms = forward_ms, backward_ms

    def forward(self, x):
        return _Spin.apply(x, self.forward_ms / 1e3, self.backward_ms / 1e3)

    def extra_repr(self):
        return f"forward_ms={self.forward_ms}, backward_ms={self.backward_ms}"


def run_training_schedule(module: nn.Module, actions, prev_rank: int | None, next_rank: int | None,
                          micro_batches: list[torch.Tensor] | None = None,
                          targets: list[torch.Tensor] | None = None, loss_fn=None, group=None,
                          timeline=None) -> torch.Tensor | None:
    """Run this rank's ordered `actions` (("F", mb) forward, ("B", mb) full backward) for one stage.

    First stage: `micro_batches[mb]` is the input of F mb. Last stage: `loss_fn(output, targets[mb])` is
    the loss whose backward starts B mb; the losses are divided by the number of micro-batches, so the
    gradients accumulated in `module` equal those of the mean loss over the whole batch.
    Activations go forward with send_tensor to `next_rank`, gradients come back to `prev_rank`.
    Returns the summed loss on the last stage, None elsewhere. Spans "F"/"B" go to `timeline` if given.
    """
    is_first, is_last = prev_rank is None, next_rank is None
    m = sum(1 for a in actions if a[0] == "F")
    inputs, outputs, pending, total = {}, {}, [], None
    for action in actions:
        kind, mb = action[0], action[1]
        if kind == "F":
            x = micro_batches[mb] if is_first else recv_tensor(prev_rank, group).requires_grad_()
            with _span(timeline, "F", mb):
                y = module(x)
                if is_last:
                    y = loss_fn(y, targets[mb]) / m
                    total = y.detach() if total is None else total + y.detach()
            inputs[mb], outputs[mb] = x, y
            if not is_last:
                pending += send_tensor(y, next_rank, group)
        elif kind == "B":
            grad = None if is_last else recv_tensor(next_rank, group)
            with _span(timeline, "B", mb):
                torch.autograd.backward(outputs.pop(mb), grad)
            x = inputs.pop(mb)
            if not is_first:
                pending += send_tensor(x.grad, prev_rank, group)
        else:
            raise ValueError(f"run_training_schedule runs F and B actions, got {action!r}")
    wait_all(pending)
    if inputs:
        raise RuntimeError(f"micro-batches {sorted(inputs)} were forwarded but never backwarded")
    return total


def _span(timeline, label, mb):
    if timeline is None:
        from contextlib import nullcontext
        return nullcontext()
    return timeline.span(label, micro_batch=mb)
