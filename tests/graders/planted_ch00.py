"""Wrong answers to chapter 0's exercises, planted to prove that the graders catch them.

tests/graders/test_ch00_warmup.py::test_planted_mistakes_are_caught runs each through its exercise's own checks and
asserts that it fails with the message that points at its mistake. None of them is an answer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class Planted:
    exercise: str
    name: str
    doc: str
    caught_by: str                          # regex the grader's message must match
    functions: dict = field(default_factory=dict)
    world_size: int = 3
    hangs: bool = False                     # the job deadlocks: caught by the launcher's timeout


# ------------------------------------------------------------------------------------------------ 0.1

def formula(rank, world_size):
    return world_size * (world_size - 1) // 2


def formula_beside_all_reduce(rank, world_size):
    t = torch.tensor([rank])
    dist.all_reduce(t)                      # the ranks talk, but the answer ignores what they said
    return world_size * (world_size - 1) // 2


def all_gather_then_sum(rank, world_size):
    parts = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(parts, torch.tensor([rank]))
    return int(torch.cat(parts).sum())


def returns_a_tensor(rank, world_size):
    t = torch.tensor([rank])
    dist.all_reduce(t)
    return t


# ------------------------------------------------------------------------------------------------ 0.2

def all_gather_then_pick(rank, world_size, value):
    parts = [torch.empty_like(value) for _ in range(world_size)]
    dist.all_gather(parts, value.contiguous())
    return parts[(rank - 1) % world_size]


def blocking_send_first(rank, world_size, value):
    if world_size == 1:
        return value.clone()
    received = torch.empty_like(value)
    dist.send(value.contiguous(), (rank + 1) % world_size)   # every rank sends first: nobody receives
    dist.recv(received, (rank - 1) % world_size)
    return received


def same_tensor_alone(rank, world_size, value):
    if world_size == 1:
        return value                        # the docstring asks for a copy
    received = torch.empty_like(value)
    for work in [dist.isend(value.contiguous(), (rank + 1) % world_size),
                 dist.irecv(received, (rank - 1) % world_size)]:
        work.wait()
    return received


def wrong_direction(rank, world_size, value):
    received = torch.empty_like(value)
    for work in [dist.isend(value.contiguous(), (rank - 1) % world_size),
                 dist.irecv(received, (rank + 1) % world_size)]:
        work.wait()
    return received


PLANTED = [
    Planted("0.1", "formula", "n(n-1)/2 and no collective", r"no all_reduce ran",
            {"sum_of_ranks": formula}),
    Planted("0.1", "formula-beside-all-reduce", "an all_reduce whose result is ignored",
            r"shifted by 1000", {"sum_of_ranks": formula_beside_all_reduce}),
    Planted("0.1", "all-gather-then-sum", "another collective", r"no all_reduce ran \(saw: all_gather",
            {"sum_of_ranks": all_gather_then_sum}),
    Planted("0.1", "returns-a-tensor", "a tensor, not a Python int", r"return a Python int",
            {"sum_of_ranks": returns_a_tensor}),
    Planted("0.2", "all-gather-then-pick", "a collective instead of one message each way",
            r"point-to-point messages", {"ring_pass": all_gather_then_pick}),
    Planted("0.2", "blocking-send-first", "a blocking send on every rank before any receive",
            r"blocking dist\.send before posting its receive|stuck[\s\S]*in send", {"ring_pass": blocking_send_first},
            hangs=True),
    Planted("0.2", "same-tensor-alone", "world_size 1 returns `value` itself",
            r"return a copy of `value`", {"ring_pass": same_tensor_alone}, world_size=1),
    Planted("0.2", "wrong-direction", "sends left, receives from the right",
            r"should hold rank \d's value", {"ring_pass": wrong_direction}),
]
