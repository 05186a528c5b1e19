"""Record every torch.distributed collective a rank calls: op, group, bytes, time.

    with CommTracer() as trace:          # inside a rank
        y = model(x)                     # any code that calls dist.all_reduce(...), dist.all_gather(...), ...
    print(trace.table())                 # one line per op: which op, which ranks, how many bytes
    trace.total_bytes()                  # bytes this rank put on the wire

It wraps the functions of `torch.distributed` for the duration of the `with` block, so code that calls
`dist.all_reduce(...)` (attribute lookup at call time) is traced. `payload` is the size of the tensor(s)
the op is about; `wire` is what each rank sends with a ring algorithm (nccl-tests' convention: all_reduce
2(n-1)/n·S, all_gather and reduce_scatter (n-1)/n·S, send S), the figure that bandwidth divides into.
PyTorch's own `torch.distributed.tensor.debug.CommDebugMode` counts collectives of DTensor code the same way.
`dist.batch_isend_irecv([dist.P2POp(dist.isend, ...), ...])` is traced too: one isend/irecv record per P2POp.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

# op name -> (function computing the payload bytes from the call's arguments, wire factor as f(n))
def _nbytes(t):
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


_OPS = {
    "all_reduce":        (lambda a, k: _nbytes(a[0]),            lambda n: 2 * (n - 1) / n),
    "all_gather":        (lambda a, k: _nbytes(a[0]),            lambda n: (n - 1) / n),
    "all_gather_into_tensor": (lambda a, k: _nbytes(a[0]),       lambda n: (n - 1) / n),
    "all_gather_single": (lambda a, k: _nbytes(a[0]),            lambda n: (n - 1) / n),
    "reduce_scatter":    (lambda a, k: _nbytes(a[1]),            lambda n: (n - 1) / n),
    "reduce_scatter_tensor": (lambda a, k: _nbytes(a[1]),        lambda n: (n - 1) / n),
    "reduce_scatter_single": (lambda a, k: _nbytes(a[1]),        lambda n: (n - 1) / n),
    "all_to_all":        (lambda a, k: _nbytes(a[1]),            lambda n: (n - 1) / n),
    "all_to_all_single": (lambda a, k: _nbytes(a[1]),            lambda n: (n - 1) / n),
    "broadcast":         (lambda a, k: _nbytes(a[0]),            lambda n: 1.0),
    "reduce":            (lambda a, k: _nbytes(a[0]),            lambda n: 1.0),
    "gather":            (lambda a, k: _nbytes(a[0]),            lambda n: 1.0),
    "scatter":           (lambda a, k: _nbytes(a[0]),            lambda n: 1.0),
    "send":              (lambda a, k: _nbytes(a[0]),            lambda n: 1.0),
    "isend":             (lambda a, k: _nbytes(a[0]),            lambda n: 1.0),
    "recv":              (lambda a, k: _nbytes(a[0]),            lambda n: 0.0),
    "irecv":             (lambda a, k: _nbytes(a[0]),            lambda n: 0.0),
    "barrier":           (lambda a, k: 0,                        lambda n: 0.0),
}


def _untracing_p2pop(base):
    class P2POp(base):
        """dist.P2POp that unwraps a traced dist.isend / dist.irecv back to the real function."""
        def __new__(cls, op, *args, **kwargs):
            return base.__new__(cls, getattr(op, "__wrapped__", op), *args, **kwargs)

        def __init__(self, op, *args, **kwargs):
            super().__init__(getattr(op, "__wrapped__", op), *args, **kwargs)
    return P2POp


@dataclass
class CommRecord:
    op: str
    ranks: tuple        # global ranks of the group the op ran in
    payload: int        # bytes of the tensor(s) the op is about
    wire: int           # bytes this rank sends with a ring algorithm
    seconds: float      # wall time of the call (of the launch only, for async ops)


class CommTracer:
    def __init__(self):
        self.records: list[CommRecord] = []
        self._saved = {}

    def __enter__(self):
        for name in _OPS:
            if hasattr(dist, name):
                self._saved[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self._saved[name]))
        # P2POp accepts only the real isend/irecv (batch_isend_irecv tests `op is isend`): hand it those, and
        # record the batch's ops in the batch_isend_irecv wrapper instead.
        self._saved["P2POp"], self._saved["batch_isend_irecv"] = dist.P2POp, dist.batch_isend_irecv
        dist.P2POp = _untracing_p2pop(dist.P2POp)
        dist.batch_isend_irecv = self._wrap_batch(self._saved["batch_isend_irecv"])
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()
        return False

    def _wrap(self, name, fn):
        payload_of, factor = _OPS[name]

        @functools.wraps(fn)
        def traced(*args, **kwargs):
            group = kwargs.get("group")
            ranks = tuple(dist.get_process_group_ranks(group)) if group is not None \
                else tuple(range(dist.get_world_size()))
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            seconds = time.perf_counter() - start
            payload = payload_of(args, kwargs)
            self.records.append(CommRecord(name, ranks, payload, int(payload * factor(len(ranks))), seconds))
            return out
        return traced

    def _wrap_batch(self, fn):
        @functools.wraps(fn)
        def traced(p2p_op_list):
            start = time.perf_counter()
            out = fn(p2p_op_list)
            seconds = time.perf_counter() - start
            for p in p2p_op_list:
                name = getattr(p.op, "__name__", "isend")
                payload_of, factor = _OPS.get(name, _OPS["isend"])
                ranks = tuple(dist.get_process_group_ranks(p.group))
                payload = payload_of((p.tensor,), {})
                self.records.append(CommRecord(name, ranks, payload, int(payload * factor(len(ranks))),
                                               seconds / len(p2p_op_list)))
            return out
        return traced

    # --------------------------------------------------------------------------------- summaries
    def total_bytes(self) -> int:
        return sum(r.wire for r in self.records)

    def counts(self) -> dict:
        out: dict = {}
        for r in self.records:
            out[r.op] = out.get(r.op, 0) + 1
        return out

    def table(self, timings: bool = False) -> str:
        """One line per call; timings are off by default because they differ run to run."""
        lines = []
        for r in self.records:
            line = f"{r.op:<22} group={list(r.ranks)!s:<14} payload={r.payload:>9,d} B  wire={r.wire:>9,d} B"
            if timings:
                line += f"  {r.seconds * 1e3:.3f} ms"
            lines.append(line)
        lines.append(f"{'total':<22} {len(self.records)} call(s), {self.total_bytes():,d} B on the wire")
        return "\n".join(lines)
