"""Wrong answers to chapter 1's exercises, planted to prove that the graders catch them.

Each produces the right numbers, or nearly, the wrong way: a built-in collective in disguise, chunks sent
straight to their owners instead of round a ring, the whole tensor on the wire, a contract not kept.
tests/graders/test_ch01_collectives.py::test_planted_mistakes_are_caught runs each through its exercise's own
checks and asserts that it fails with the message that points at its mistake. None of them is an answer:
each fails its grader. They are written for contiguous tensors and the ops the quick cases use.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
# bound at import: dist.* wrappers miss it
from torch.distributed.distributed_c10d import all_reduce as _aliased_all_reduce

from helpers.course.partition import chunk_bounds

SUM, AVG = dist.ReduceOp.SUM, dist.ReduceOp.AVG


@dataclass
class Planted:
    exercise: str
    name: str
    doc: str
    caught_by: str                          # regex the grader's message must match
    functions: dict = field(default_factory=dict)


def _group_view(group):
    members = list(range(dist.get_world_size())) if group is None else dist.get_process_group_ranks(group)
    return members, members.index(dist.get_rank())


def _sum_only(op, dtype, allow_int_avg=False):
    if op == AVG and (allow_int_avg or dtype.is_floating_point):
        return
    if op != SUM:
        raise ValueError(f"op={op} is not supported here")


def _wait(works):
    for w in works:
        w.wait()


def _to_everyone(group, members, me, send, recv_into):
    """Send send(j) to every other member j and receive recv_into(j) from each, all posted at once."""
    works, keep = [], []
    for j, peer in enumerate(members):
        if j == me:
            continue
        out, buf = send(j), recv_into(j)
        if out.numel():
            keep.append(out)
            works.append(dist.isend(out, peer, group))
        if buf.numel():
            works.append(dist.irecv(buf, peer, group))
    _wait(works)


# ------------------------------------------------------------------------------------------ 1.1 / 1.4

def builtin_all_reduce(tensor, op=SUM, group=None):
    _sum_only(op, tensor.dtype)
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def aliased_all_reduce(tensor, op=SUM, group=None):
    _sum_only(op, tensor.dtype)
    _aliased_all_reduce(tensor, op, group)
    return tensor


def direct_all_reduce(tensor, op=SUM, group=None, check=True):
    """Chunk j straight to rank j, then each owner's sum straight to everyone: 2(n-1) messages of S/n,
    the ring's counts and bytes, but every rank talks to every rank (not a ring)."""
    if check:
        _sum_only(op, tensor.dtype)
    members, me = _group_view(group)
    flat, n = tensor.view(-1), len(members)
    bounds = chunk_bounds(flat.numel(), n)
    a, b = bounds[me]
    parts = {}
    _to_everyone(group, members, me, lambda j: flat[slice(*bounds[j])].clone(),
                 lambda j: parts.setdefault(j, torch.empty(b - a, dtype=flat.dtype)))
    for part in parts.values():
        flat[a:b] += part
    _to_everyone(group, members, me, lambda j: flat[a:b].clone(), lambda j: flat[slice(*bounds[j])])
    if op == AVG:
        flat.div_(n) if flat.is_floating_point() else flat.floor_divide_(n)
    return tensor


def whole_tensor_ring(tensor, op=SUM, group=None):
    """Each rank's whole tensor travels round the ring: n-1 messages of S, not 2(n-1) of S/n."""
    _sum_only(op, tensor.dtype)
    members, me = _group_view(group)
    n = len(members)
    passing, total = tensor.clone(), tensor.clone()
    for _ in range(n - 1):
        incoming = torch.empty_like(passing)
        _wait(dist.batch_isend_irecv([dist.P2POp(dist.isend, passing, members[(me + 1) % n], group),
                                      dist.P2POp(dist.irecv, incoming, members[(me - 1) % n], group)]))
        total += incoming
        passing = incoming
    tensor.copy_(total)
    return tensor


def gather_to_root_and_back(tensor, op=SUM, group=None):
    """The first rank receives every tensor, sums, and sends the sum back: a star, not a ring."""
    _sum_only(op, tensor.dtype)
    members, me = _group_view(group)
    if me == 0:
        for peer in members[1:]:
            buf = torch.empty_like(tensor)
            dist.recv(buf, peer, group)
            tensor += buf
        for peer in members[1:]:
            dist.send(tensor, peer, group)
    else:
        dist.send(tensor, members[0], group)
        dist.recv(tensor, members[0], group)
    return tensor


def int_avg_accepted(tensor, op=SUM, group=None):
    """AVG on integers silently floor-divided, where the docstring (and dist.all_reduce) refuse it; otherwise
    the reference ring, so that this is the only mistake the grader can see."""
    from solutions.ring_collectives import ring_all_reduce
    if op == AVG and not tensor.dtype.is_floating_point:
        ring_all_reduce(tensor, SUM, group)
        return tensor.floor_divide_(dist.get_world_size(group))
    return ring_all_reduce(tensor, op, group)


def everyone_to_everyone(tensor, op=SUM, group=None):
    """Every rank sends its whole tensor to every other rank: n-1 messages of S, not log2(n)."""
    _sum_only(op, tensor.dtype)
    members, me = _group_view(group)
    received = {}
    _to_everyone(group, members, me, lambda j: tensor.clone(),
                 lambda j: received.setdefault(j, torch.empty_like(tensor)))
    for part in received.values():
        tensor += part
    return tensor


# ------------------------------------------------------------------------------------------------ 1.2

def builtin_all_gather(output, input, group=None):
    members, _ = _group_view(group)
    if output.shape[0] != len(members) * input.shape[0]:
        raise ValueError("wrong output shape")
    dist.all_gather_single(output, input, group=group)
    return output


def direct_all_gather(output, input, group=None, check=True):
    """Every rank sends its block straight to every other rank: n-1 messages of one block, not a ring."""
    members, me = _group_view(group)
    m = input.shape[0]
    if check and output.shape[0] != len(members) * m:
        raise ValueError("wrong output shape")
    output[me * m:(me + 1) * m] = input
    _to_everyone(group, members, me, lambda j: input.contiguous(), lambda j: output[j * m:(j + 1) * m])
    return output


def no_shape_check_all_gather(output, input, group=None):
    """Writes the blocks into the first n*m rows of whatever output it is given: no ValueError (otherwise the
    reference ring, so that this is the only mistake the grader can see)."""
    from solutions.ring_collectives import ring_all_gather
    needed = dist.get_world_size(group) * input.numel()
    if output.is_contiguous() and output.numel() >= needed:
        ring_all_gather(output.view(-1)[:needed].view(-1, *input.shape[1:]), input, group)
        return output
    return direct_all_gather(output, input, group, check=False)


# ------------------------------------------------------------------------------------------------ 1.3

def builtin_reduce_scatter(output, input, op=SUM, group=None):
    _sum_only(op, input.dtype)
    members, _ = _group_view(group)
    if input.shape[0] != len(members) * output.shape[0]:
        raise ValueError("wrong input shape")
    dist.reduce_scatter_single(output, input.clone(), op=op, group=group)
    return output


def all_reduce_then_keep_block(output, input, op=SUM, group=None):
    """A whole all-reduce, then keep this rank's block: twice the messages a reduce-scatter needs."""
    _sum_only(op, input.dtype)
    members, me = _group_view(group)
    if input.shape[0] != len(members) * output.shape[0]:
        raise ValueError("wrong input shape")
    full = direct_all_reduce(input.clone(), op, group)
    m = output.shape[0]
    output.copy_(full[me * m:(me + 1) * m])
    return output


def reduce_scatter_in_input(output, input, op=SUM, group=None):
    """The reference ring, then this rank's reduced block left in `input` itself, as a ring that accumulates in
    the caller's buffer leaves it: the caller's tensor changes (the only mistake the grader can see)."""
    from solutions.ring_collectives import ring_reduce_scatter
    ring_reduce_scatter(output, input, op, group)
    me, m = dist.get_rank(group), output.shape[0]
    input[me * m:(me + 1) * m] = output
    return output


PLANTED = [
    Planted("1.1", "calls-dist-all-reduce", "dist.all_reduce inside the ring function",
            r"called dist\.all_reduce", {"ring_all_reduce": builtin_all_reduce}),
    Planted("1.1", "aliased-all-reduce", "an all_reduce bound at import time, beneath any dist.* wrapper",
            r"built-in collective ran beneath dist\.\* \(all_reduce", {"ring_all_reduce": aliased_all_reduce}),
    Planted("1.1", "direct-exchange", "right counts and bytes, but chunks go straight to their owners",
            r"in a ring \(group", {"ring_all_reduce": direct_all_reduce}),
    Planted("1.1", "whole-tensor-ring", "the whole tensor round the ring: n-1 messages of S",
            r"expected 6 of .*ring all-reduce", {"ring_all_reduce": whole_tensor_ring}),
    Planted("1.1", "gather-to-root", "one rank sums everything and sends it back",
            r"expected 6 of .*ring all-reduce", {"ring_all_reduce": gather_to_root_and_back}),
    Planted("1.1", "int-avg-accepted", "AVG on an integer tensor floor-divided instead of refused",
            r"op=AVG on an int64 tensor: raise ValueError", {"ring_all_reduce": int_avg_accepted}),
    Planted("1.2", "calls-dist-all-gather", "dist.all_gather_single inside",
            r"called dist\.all_gather_single", {"ring_all_gather": builtin_all_gather}),
    Planted("1.2", "direct-all-gather", "each block sent straight to every rank: right counts, not a ring",
            r"in a ring \(group", {"ring_all_gather": direct_all_gather}),
    Planted("1.2", "no-shape-check", "an output of the wrong shape accepted",
            r"output of shape .*raise ValueError", {"ring_all_gather": no_shape_check_all_gather}),
    Planted("1.3", "calls-dist-reduce-scatter", "dist.reduce_scatter_single inside",
            r"called dist\.reduce_scatter_single", {"ring_reduce_scatter": builtin_reduce_scatter}),
    Planted("1.3", "all-reduce-then-keep-block", "a whole all-reduce: 2(n-1) messages instead of n-1",
            r"expected 3 of .*blocks", {"ring_reduce_scatter": all_reduce_then_keep_block}),
    Planted("1.3", "modifies-input", "sums into the caller's input tensor",
            r"`input` was modified", {"ring_reduce_scatter": reduce_scatter_in_input}),
    Planted("1.4", "calls-dist-all-reduce", "dist.all_reduce inside",
            r"called dist\.all_reduce", {"recursive_doubling_all_reduce": builtin_all_reduce}),
    Planted("1.4", "chunked-exchange", "a reduce-scatter/all-gather exchange (messages of S/n), not doubling",
            r"recursive doubling exchanges the whole tensor", {"recursive_doubling_all_reduce": direct_all_reduce}),
    Planted("1.4", "everyone-to-everyone", "every rank sends its whole tensor to every other: n-1 messages",
            r"expected 2 of .*recursive doubling", {"recursive_doubling_all_reduce": everyone_to_everyone}),
]
