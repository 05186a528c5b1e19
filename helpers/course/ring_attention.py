"""Context parallelism, given code for chapter 8: how a long prompt's sequence is cut over ranks, full
attention to compare with, the causal work each rank does, and a meter of the bytes a call allocates.

A prompt of S tokens is cut into 2·cp chunks of S/(2·cp) tokens. Two layouts:

    order="contiguous"   rank i holds chunks 2i and 2i+1  (one block of S/cp consecutive tokens)
    order="zigzag"       rank i holds chunks i and 2cp-1-i (Megatron's context parallelism, Llama 3)

Under a causal mask a query attends only to keys at or before it, so with the contiguous layout the last
rank does most of the work and the first rank almost none; the zigzag pairs an early chunk with a late one
and every rank does the same work (`causal_work`).

Shapes: q, k, v are [heads, seq, head_dim] (one sequence; batch and heads are alike for attention).
"""
from __future__ import annotations

import math
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["ORDERS", "chunks_of_rank", "positions_of_rank", "shard_sequence", "unshard_sequence",
           "attention_reference", "causal_work", "PeakMemory", "TransferOverlap"]

ORDERS = ("zigzag", "contiguous")


def _check_layout(seq_len: int, cp: int, order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"order={order!r}: use one of {ORDERS}")
    if cp < 1:
        raise ValueError(f"cp={cp}: the context-parallel degree is at least 1")
    if seq_len % (2 * cp):
        raise ValueError(f"seq_len={seq_len} is not divisible by 2·cp={2 * cp}: the sequence is cut into 2·cp "
                         f"equal chunks; pad the prompt to a multiple of {2 * cp}")


def chunks_of_rank(rank: int, cp: int, order: str = "zigzag") -> tuple[int, int]:
    """The two chunk indices (of 2·cp) that `rank` holds, earlier chunk first."""
    if order not in ORDERS:
        raise ValueError(f"order={order!r}: use one of {ORDERS}")
    if not 0 <= rank < cp:
        raise ValueError(f"rank={rank} is not in 0..{cp - 1}")
    return (rank, 2 * cp - 1 - rank) if order == "zigzag" else (2 * rank, 2 * rank + 1)


def positions_of_rank(seq_len: int, rank: int, cp: int, order: str = "zigzag") -> torch.Tensor:
    """Global token positions of the rows `rank` holds, in the order it holds them: [seq_len / cp]."""
    _check_layout(seq_len, cp, order)
    chunk = seq_len // (2 * cp)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in chunks_of_rank(rank, cp, order)])


def shard_sequence(x: torch.Tensor, rank: int, cp: int, order: str = "zigzag", dim: int = -2) -> torch.Tensor:
    """Rank `rank`'s rows of x along the sequence dimension `dim` (a copy)."""
    return x.index_select(dim, positions_of_rank(x.shape[dim], rank, cp, order)).contiguous()


def unshard_sequence(parts, order: str = "zigzag", dim: int = -2) -> torch.Tensor:
    """Inverse of shard_sequence: the full tensor from every rank's part, in rank order."""
    cp = len(parts)
    seq_len = parts[0].shape[dim] * cp
    full = torch.empty(*parts[0].shape[:dim % parts[0].dim()], seq_len, *parts[0].shape[dim % parts[0].dim() + 1:],
                       dtype=parts[0].dtype)
    for rank, part in enumerate(parts):
        full.index_copy_(dim % full.dim(), positions_of_rank(seq_len, rank, cp, order), part)
    return full


def attention_reference(q, k, v, causal: bool = True) -> torch.Tensor:
    """softmax(q kᵀ / √d, causal mask) v on the whole sequence, in one process: [heads, seq, head_dim]."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        n = q.shape[-2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def causal_work(seq_len: int, cp: int, order: str = "zigzag", causal: bool = True) -> list[int]:
    """Work units per rank of causal ring attention: the (query chunk, key chunk) pairs a rank must compute,
    one unit per pair of S/(2cp)-token chunks (a pair the mask hides entirely is skipped; a diagonal pair is
    computed whole and masked). Without a mask every rank computes 2·cp·2 pairs."""
    _check_layout(seq_len, cp, order)
    every = [c for r in range(cp) for c in chunks_of_rank(r, cp, order)]
    return [sum(1 for qc in chunks_of_rank(r, cp, order) for kc in every if not causal or kc <= qc)
            for r in range(cp)]


class PeakMemory(TorchDispatchMode):
    """Counts the bytes of the tensors allocated while it is active and still alive: `peak` is the most at
    any moment, `current` what is held now (tensors created before the mode do not count; views share their
    base's storage and count once). A measurement of real tensors, on CPU as on GPU.

        with PeakMemory() as mem:
            out = ring_attention(q, k, v)
        mem.peak      # bytes
    """

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._live = {}

    def _free(self, key, nbytes):
        if self._live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes())
                if key[0] and key not in self._live and storage.nbytes():
                    self._live[key] = weakref.finalize(storage, self._free, key, storage.nbytes())
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
        return out


class TransferOverlap(TorchDispatchMode):
    """Measures how much of a function's matmul work runs while one of its point-to-point transfers is in flight
    (posted by dist.isend / dist.irecv / dist.batch_isend_irecv and not yet waited for): the overlap a ring
    attention can get on real hardware, read off the learner's own code instead of a timing.

        with TransferOverlap() as meter:
            out = ring_attention(q, k, v)
        meter.overlapped_flops, meter.total_flops     # matmul FLOPs (mm, bmm, addmm, baddbmm)

    A blocking dist.send / dist.recv is never in flight; a request counts as done when its wait() returns."""

    _MATMULS = {"mm", "bmm", "addmm", "baddbmm"}

    def __init__(self):
        super().__init__()
        self.total_flops = self.overlapped_flops = 0
        self._pending = set()
        self._saved = {}

    def _track(self, work):
        meter, key = self, object()
        self._pending.add(key)

        class Tracked:
            def wait(self, *args, **kwargs):
                result = work.wait(*args, **kwargs)
                meter._pending.discard(key)
                return result

            def __getattr__(self, name):
                return getattr(work, name)
        return Tracked()

    def __enter__(self):
        import torch.distributed as dist
        for name in ("isend", "irecv", "batch_isend_irecv", "P2POp"):
            self._saved[name] = getattr(dist, name)
        originals = {}

        def wrap(original, many):
            def call(*args, **kwargs):
                works = original(*args, **kwargs)
                return [self._track(w) for w in works] if many else self._track(works)
            originals[call] = original
            return call
        dist.isend, dist.irecv = wrap(self._saved["isend"], False), wrap(self._saved["irecv"], False)
        dist.batch_isend_irecv = wrap(self._saved["batch_isend_irecv"], True)
        p2p_op = self._saved["P2POp"]          # a P2POp must hold the real isend/irecv (c10d checks `op is isend`)
        dist.P2POp = lambda op, *args, **kwargs: p2p_op(originals.get(op, op), *args, **kwargs)
        return super().__enter__()

    def __exit__(self, *exc):
        import torch.distributed as dist
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in self._MATMULS:
            a, b = args[-2], args[-1]
            flops = 2 * a.numel() * b.shape[-1]
            self.total_flops += flops
            if self._pending:
                self.overlapped_flops += flops
        return out
