"""The plumbing of a pipeline on real ranks — not an exercise, code to read (chapter 3).

* `send_tensor` / `recv_tensor`: point-to-point transfer of an activation whose shape the receiver does not
  know yet (a small header with dtype and shape goes first, then the data). `send_tensor` uses `isend`,
  so a stage hands its output over and moves on to the next micro-batch instead of waiting for the next
  stage to be ready: that is what lets stages overlap.
* `stage_neighbours`: the global ranks before and after this rank in a list of stage ranks, so a pipeline
  can live on any ranks of a bigger grid (hybrid parallelism), not only on ranks 0..p-1.
* `DeviceTime`: a stage's "device time" held fixed (see its docstring: why not real matmuls on 2 cores).
  `DeviceStep`: the same for a step whose host work is real (the tiny Llama's layers): the work runs
  inside the fixed time instead of before it.
* `run_training_schedule`: executes one rank's list of F/B actions (from `helpers.course.schedule_sim` or your
  `pipeline_schedules.one_f_one_b_order`) with real forward and backward passes across ranks.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.fx.experimental.symbolic_shapes  # noqa: F401 - see below
from torch import nn

# torch.autograd.backward(outputs, grad_tensors) imports symbolic_shapes (and sympy) on its first call in a
# process: seconds, in every forked rank of every job that trains (run_training_schedule). Imported here,
# in the parent, before launch() forks, it is paid once.

__all__ = ["send_tensor", "recv_tensor", "stage_neighbours", "busy_wait", "DeviceTime", "DeviceStep",
           "run_training_schedule", "wait_all"]

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool]
_MAX_DIMS = 6
_HEADER = 8                 # int64 words: dtype, ndim, inline?, shape (up to 5 dims... see _MAX_DIMS)
_INLINE_BYTES = 1 << 16     # activations up to 64 KiB travel in the same message as their header
_TAG = 3                    # pipeline messages have their own tag: they never match another recv
_posted: dict = {}          # (src, group) -> (work, buffer) of a receive posted ahead (prefetch)


def send_tensor(tensor: torch.Tensor, dst: int, group=None) -> list:
    """Start sending `tensor` to global rank `dst`; returns the `Work` handles (see `wait_all`).

    One message [header | data] when the data is small (the usual case here), else a header message and
    a data message. The header says dtype and shape, because the receiver does not know them.
    Note: gloo (like NCCL) moves the data only once the receiver has posted its receive; `isend` just
    lets this rank go on meanwhile. That is why receivers post their next receive early (prefetch).
    """
    if tensor.dim() > _HEADER - 3:
        raise ValueError(f"send_tensor handles at most {_HEADER - 3} dimensions, got shape {tuple(tensor.shape)}")
    tensor = tensor.detach().contiguous()
    nbytes = tensor.numel() * tensor.element_size()
    header = torch.zeros(_HEADER, dtype=torch.int64)
    header[0], header[1], header[2] = _DTYPES.index(tensor.dtype), tensor.dim(), int(nbytes <= _INLINE_BYTES)
    header[3:3 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    if nbytes <= _INLINE_BYTES:
        message = torch.cat([header.view(torch.uint8), tensor.reshape(-1).view(torch.uint8)])
        return [dist.isend(message, dst, group=group, tag=_TAG), message]   # keep the buffer alive
    return [dist.isend(header.view(torch.uint8), dst, group=group, tag=_TAG),
            dist.isend(tensor, dst, group=group, tag=_TAG), header, tensor]


def _post(src, group):
    buffer = torch.empty(_HEADER * 8 + _INLINE_BYTES, dtype=torch.uint8)
    return dist.irecv(buffer, src, group=group, tag=_TAG), buffer


def recv_tensor(src: int, group=None, prefetch: bool = False) -> torch.Tensor:
    """Receive a tensor sent by `send_tensor` from global rank `src` (blocks until it arrives).

    prefetch=True: after this one, post the receive of the NEXT tensor from `src` at once, so the sender's
    data can flow while this rank computes. Only when another tensor from `src` will surely come (a posted
    receive that is never matched would linger until the process ends).
    """
    work, buffer = _posted.pop((src, group), None) or _post(src, group)
    work.wait()
    header = buffer[:_HEADER * 8].view(torch.int64)
    dtype, ndim, inline = _DTYPES[int(header[0])], int(header[1]), bool(header[2])
    shape = header[3:3 + ndim].tolist()
    if inline:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        out = buffer[_HEADER * 8:_HEADER * 8 + nbytes].clone().view(dtype).reshape(shape)
    else:
        out = torch.empty(shape, dtype=dtype)
        dist.recv(out, src, group=group, tag=_TAG)
    if prefetch:
        _posted[(src, group)] = _post(src, group)
    return out


def wait_all(handles: list) -> None:
    """Wait for every `Work` in a list returned by `send_tensor` (the buffers in it are then dropped)."""
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


def _hold(seconds: float, spin: bool) -> None:
    if seconds > 0:
        busy_wait(seconds) if spin else time.sleep(seconds)


class _DeviceTime(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward_s, backward_s, spin):
        ctx.backward_s, ctx.spin = backward_s, spin
        _hold(forward_s, spin)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        _hold(ctx.backward_s, ctx.spin)
        return grad, None, None, None


class DeviceTime(nn.Module):
    """Identity whose forward (and backward) take a fixed wall time: the stage's "device time".

    Why: a stage of a real pipeline owns its accelerator, and its kernels take the same time whatever the
    other stages do. Here 4 ranks share 2 CPU cores (and other people's jobs). With real matmuls, when 4
    stages compute at once each gets about half a core and takes twice as long as alone, so the measured
    timeline no longer has the shape pipeline theory describes. A fixed wall time does not stretch.

    spin=False (default): the rank sleeps, as a host thread waits for its GPU; the cores stay free for the
    sends and receives, whose latency is what the pipeline is sensitive to. spin=True: the rank busy-waits
    (it computes, and competes for the cores like real compute would).
    """

    def __init__(self, forward_ms: float, backward_ms: float = 0.0, spin: bool = False):
        super().__init__()
        self.forward_ms, self.backward_ms, self.spin = forward_ms, backward_ms, spin

    def forward(self, x):
        return _DeviceTime.apply(x, self.forward_ms / 1e3, self.backward_ms / 1e3, self.spin)

    def extra_repr(self):
        return f"forward_ms={self.forward_ms}, backward_ms={self.backward_ms}, spin={self.spin}"


class DeviceStep:
    """`fn` as a stage step that takes `ms` of wall time in all, its own work included ("device time").

        stage.forward = DeviceStep(stage.forward, 50)   # every call takes 50 ms, compute included

    The step runs `fn`, then sleeps what is left of `ms` (a step whose work takes longer takes that long).
    Unlike `DeviceTime`, which adds a fixed time after the work, the work here is hidden inside the fixed
    time: when 4 ranks share 2 cores, a step's CPU work is slower while all 4 compute at once than while
    one does, and with the work outside the fixed time that slowdown would change the timeline's shape for
    reasons that are not the schedule's. `host_seconds` keeps how long `fn` itself took at each call.
    """

    def __init__(self, fn, ms: float):
        self.fn, self.ms, self.host_seconds = fn, ms, []

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        done = time.perf_counter()
        self.host_seconds.append(done - start)
        left = start + self.ms / 1e3 - done
        if left > 0:
            time.sleep(left)
        return out


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
    forwards_left, backwards_left = m, sum(1 for a in actions if a[0] == "B")
    for action in actions:
        kind, mb = action[0], action[1]
        if kind == "F":
            forwards_left -= 1
            x = micro_batches[mb] if is_first else \
                recv_tensor(prev_rank, group, prefetch=forwards_left > 0).requires_grad_()
            with _span(timeline, "F", mb):
                y = module(x)
                if is_last:
                    y = loss_fn(y, targets[mb]) / m
                    total = y.detach() if total is None else total + y.detach()
            inputs[mb], outputs[mb] = x, y
            if not is_last:
                pending += send_tensor(y, next_rank, group)
        elif kind == "B":
            backwards_left -= 1
            grad = None if is_last else recv_tensor(next_rank, group, prefetch=backwards_left > 0)
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
