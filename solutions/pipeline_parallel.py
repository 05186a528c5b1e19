"""Chapter 3 pipeline parallelism: a stage that receives, computes and sends; the GPipe schedule.

A stage is one slice of the model's layers on one rank. Stages are linked by global ranks (`prev_rank`,
`next_rank`), not by their position in the world, so the same code runs a pipeline on ranks 0..p-1 or on
any column of a bigger grid (hybrid parallelism: pass the pipeline's ranks and, if you like, its group).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from helpers.course.pipeline_runtime import recv_tensor, send_tensor, stage_neighbours, wait_all


class PipelineStage:
    """One pipeline stage: `module` on this rank, between global ranks `prev_rank` and `next_rank`.

    prev_rank: global rank of the previous stage, None on the first stage (which gets its input directly).
    next_rank: global rank of the next stage, None on the last stage (which returns the output).
    group: process group the stages communicate in (default: the whole world); ranks stay global.
    """

    def __init__(self, module: nn.Module, prev_rank: int | None = None, next_rank: int | None = None,
                 group=None):
        self.module, self.prev_rank, self.next_rank, self.group = module, prev_rank, next_rank, group
        self.pending_sends: list = []   # Work handles of sends not yet known to be complete

    @classmethod
    def from_ranks(cls, module: nn.Module, stage_ranks: list[int], group=None) -> "PipelineStage":
        """The stage of this process in a pipeline laid out on global ranks `stage_ranks` (stage order)."""
        prev_rank, next_rank = stage_neighbours(stage_ranks, dist.get_rank())
        return cls(module, prev_rank, next_rank, group)

    @property
    def is_first(self) -> bool:
        return self.prev_rank is None

    @property
    def is_last(self) -> bool:
        return self.next_rank is None

    def forward(self, x: torch.Tensor | None = None, timeline=None, micro_batch: int | None = None,
                prefetch_next: bool = False):
        """Exercise 3.1 — receive, compute, send.

        First stage: compute on `x`. Other stages: ignore `x`, receive the input from `prev_rank`
        (`recv_tensor`; pass it `prefetch=prefetch_next`: when the caller knows another input will follow,
        its receive is posted before this one is computed). Then run `self.module`. Last stage: return the output.
        Other stages: start sending it to `next_rank` with `send_tensor` (non-blocking: keep its handles in
        `self.pending_sends`, so this rank can go on with the next micro-batch) and return None.
        If `timeline` is given, record the computation and the start of the send (not the receive, which
        is waiting) as `timeline.span("F", micro_batch=micro_batch)`.
        """
        if not self.is_first:
            x = recv_tensor(self.prev_rank, self.group, prefetch=prefetch_next)
        span = timeline.span("F", micro_batch=micro_batch) if timeline is not None else nullcontext()
        with span:   # the stage's own work: compute, and hand the output to the transport
            y = self.module(x)
            if not self.is_last:
                self.pending_sends += send_tensor(y, self.next_rank, self.group)
        return y if self.is_last else None

    def wait_sends(self) -> None:
        """Block until every send this stage started has completed."""
        wait_all(self.pending_sends)


def gpipe_forward(stage: PipelineStage, batch: torch.Tensor | None, num_micro_batches: int,
                  timeline=None) -> torch.Tensor | None:
    """Exercise 3.2 — GPipe forward: split the batch into micro-batches and stream them through.

    batch: [B, ...] on the first stage (ignored elsewhere); it is split along dim 0 into
    `num_micro_batches` consecutive micro-batches (torch.tensor_split: sizes differ by at most one).
    Every stage runs `stage.forward` once per micro-batch, micro-batch i with micro_batch=i (and the
    timeline), and prefetch_next=True for all but the last (another input surely follows).
    The last stage returns the outputs concatenated in micro-batch order: [B, ...], equal to
    the unsplit model's output. Other stages return None, after their sends have completed.
    Raises ValueError if num_micro_batches < 1, or (first stage) if the batch has fewer rows than
    num_micro_batches.
    """
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches={num_micro_batches} must be at least 1")
    if stage.is_first:
        if batch.shape[0] < num_micro_batches:
            raise ValueError(f"a batch of {batch.shape[0]} cannot be split into {num_micro_batches} micro-batches")
        micro_batches = torch.tensor_split(batch, num_micro_batches)
    outputs = []
    for i in range(num_micro_batches):
        y = stage.forward(micro_batches[i] if stage.is_first else None, timeline=timeline, micro_batch=i,
                          prefetch_next=i < num_micro_batches - 1)
        if stage.is_last:
            outputs.append(y)
    stage.wait_sends()
    return torch.cat(outputs) if stage.is_last else None
