"""Record every torch.distributed communication a rank makes: op, group, peer, bytes, time.

    with CommTracer() as trace:          # inside a rank
        y = model(x)                     # any code that communicates: dist.*, DDP, DTensor, ...
    print(trace.table())                 # one line per op: which op, which ranks, how many bytes
    trace.total_bytes()                  # bytes this rank put on the wire

What it sees, exactly:
  * Every call of a `torch.distributed` function (`dist.all_reduce`, `dist.send`, `dist.isend`, ...,
    `dist.batch_isend_irecv`), whatever its call form: positional or keyword arguments, `group` passed either
    way. These records carry the name of the Python function (`isend`, not `send`; `all_gather_into_tensor`),
    the ranks of the group, and for point-to-point ops the peer's global rank.
  * Every c10d operator that reaches PyTorch's dispatcher without going through those functions: DDP's
    gradient-bucket all-reduces (issued by its C++ reducer during backward) and its broadcasts of parameters
    and buffers, DTensor's functional collectives (`_c10d_functional.*`), and anything else built on
    `torch.ops.c10d` / `torch.ops._c10d_functional`. It sees them with a `TorchDispatchMode` (the mechanism
    of PyTorch's own `torch.distributed.tensor.debug.CommDebugMode`). These records have `via="c10d"`.
    A collective launched inside a traced `dist.*` call is recorded once, as that call.
  * It does not see communication that bypasses both (a raw socket, the `TCPStore`, NCCL calls from a
    custom CUDA kernel), nor work on other threads that did not inherit the mode.

`payload` is the size of the tensor(s) the op is about (for all_gather the gathered output, for
reduce_scatter and all_to_all the input); `wire` is what each rank sends with a ring algorithm (nccl-tests'
convention: all_reduce 2(n-1)/n·S, all_gather and reduce_scatter (n-1)/n·S, send S), the figure that
bandwidth divides into.
"""
from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode


def _nbytes(t):
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


def _ring(n):
    return (n - 1) / n


# Python function -> (name of the argument whose bytes are the payload, wire factor as f(group size))
_OPS = {
    "all_reduce":             ("tensor",            lambda n: 2 * (n - 1) / n),
    "all_gather":             ("tensor_list",       _ring),
    "all_gather_into_tensor": ("output_tensor",     _ring),
    "all_gather_single":      ("output_tensor",     _ring),
    "reduce_scatter":         ("input_list",        _ring),
    "reduce_scatter_tensor":  ("input",             _ring),
    "reduce_scatter_single":  ("input",             _ring),
    "all_to_all":             ("input_tensor_list", _ring),
    "all_to_all_single":      ("input",             _ring),
    "broadcast":              ("tensor",            lambda n: 1.0),
    "reduce":                 ("tensor",            lambda n: 1.0),
    "gather":                 ("tensor",            lambda n: 1.0),
    "scatter":                ("tensor",            lambda n: 1.0),
    "send":                   ("tensor",            lambda n: 1.0),
    "isend":                  ("tensor",            lambda n: 1.0),
    "recv":                   ("tensor",            lambda n: 0.0),
    "irecv":                  ("tensor",            lambda n: 0.0),
    "barrier":                (None,                lambda n: 0.0),
}
_PEER = {"send": ("dst", "group_dst"), "isend": ("dst", "group_dst"),
         "recv": ("src", "group_src"), "irecv": ("src", "group_src")}

# c10d dispatcher operator -> (course name, index of the payload argument, wire factor). Group from the
# ProcessGroup argument (torch.ops.c10d) or the group name (torch.ops._c10d_functional).
_C10D = {
    "allreduce_": ("all_reduce", 0, _OPS["all_reduce"][1]),
    "allreduce_coalesced_": ("all_reduce", 0, _OPS["all_reduce"][1]),
    "allgather_": ("all_gather", 0, _ring),
    "_allgather_base_": ("all_gather_into_tensor", 0, _ring),
    "allgather_coalesced_": ("all_gather", 0, _ring),
    "allgather_into_tensor_coalesced_": ("all_gather_into_tensor", 0, _ring),
    "reduce_scatter_": ("reduce_scatter", 1, _ring),
    "_reduce_scatter_base_": ("reduce_scatter_tensor", 1, _ring),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter_tensor", 1, _ring),
    "alltoall_": ("all_to_all", 1, _ring),
    "alltoall_base_": ("all_to_all_single", 1, _ring),
    "broadcast_": ("broadcast", 0, lambda n: 1.0),
    "reduce_": ("reduce", 0, lambda n: 1.0),
    "gather_": ("gather", 1, lambda n: 1.0),
    "scatter_": ("scatter", 0, lambda n: 1.0),
    "send": ("send", 0, lambda n: 1.0),
    "recv_": ("recv", 0, lambda n: 0.0),
    "recv_any_source_": ("recv", 0, lambda n: 0.0),
    "barrier": ("barrier", None, lambda n: 0.0),
}
_FUNCTIONAL = {   # payload = input bytes × multiplier(group size)
    "all_reduce": ("all_reduce", lambda n: 1, _OPS["all_reduce"][1]),
    "all_reduce_coalesced": ("all_reduce", lambda n: 1, _OPS["all_reduce"][1]),
    "all_gather_into_tensor": ("all_gather_into_tensor", lambda n: n, _ring),
    "all_gather_into_tensor_coalesced": ("all_gather_into_tensor", lambda n: n, _ring),
    "reduce_scatter_tensor": ("reduce_scatter_tensor", lambda n: 1, _ring),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter_tensor", lambda n: 1, _ring),
    "all_to_all_single": ("all_to_all_single", lambda n: 1, _ring),
    "broadcast": ("broadcast", lambda n: 1, lambda n: 1.0),
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
    peer: int | None = None   # point-to-point ops: the other end's global rank
    via: str = "dist"   # "dist": a torch.distributed call; "c10d": seen at the dispatcher (DDP, DTensor, ...)


def _group_ranks(group) -> tuple:
    return tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))


class _C10dSpy(TorchDispatchMode):
    """Sees c10d operators at the dispatcher, for communication that never calls a `dist.*` function."""

    def __init__(self, tracer):
        super().__init__()
        self.tracer = tracer

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # By default PyTorch wraps __torch_dispatch__ in torch._dynamo.disable, which imports torch._dynamo
        # (~800 modules, seconds) on the first traced op of every forked rank. Nothing here is compiled.
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace = getattr(func, "namespace", "")
        if self.tracer._depth or namespace not in ("c10d", "_c10d_functional"):
            return func(*args, **kwargs)
        start = time.perf_counter()
        out = func(*args, **kwargs)
        seconds = time.perf_counter() - start
        try:
            self.tracer._record_c10d(namespace, func._opname if hasattr(func, "_opname") else func.__name__,
                                     args, seconds)
        except Exception:        # a record must never break the traced program
            pass
        return out


class CommTracer:
    """Context manager recording this rank's communication; see the module docstring for what it sees."""

    def __init__(self):
        self.records: list[CommRecord] = []
        self._saved = {}
        self._depth = 0          # > 0 while inside a traced dist.* call: its dispatcher ops are that call
        self._spy = None

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
        self._spy = _C10dSpy(self)
        self._spy.__enter__()
        return self

    def __exit__(self, *exc):
        if self._spy is not None:
            self._spy.__exit__(*exc)
            self._spy = None
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved.clear()
        return False

    def _wrap(self, name, fn):
        arg_name, factor = _OPS[name]
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def traced(*args, **kwargs):
            if self._depth:          # e.g. a deprecated name calling its new name: one record, the outer one
                return fn(*args, **kwargs)
            try:
                bound = signature.bind(*args, **kwargs).arguments
            except TypeError:        # let the real function raise its own error
                return fn(*args, **kwargs)
            group = bound.get("group")
            self._depth += 1
            start = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                self._depth -= 1
            seconds = time.perf_counter() - start
            ranks = _group_ranks(group)
            payload = _nbytes(bound.get(arg_name)) if arg_name else 0
            self.records.append(CommRecord(name, ranks, payload, int(payload * factor(len(ranks))), seconds,
                                           self._peer(name, bound, group)))
            return out
        return traced

    @staticmethod
    def _peer(name, bound, group):
        if name not in _PEER:
            return None
        global_key, group_key = _PEER[name]
        if bound.get(global_key) is not None:
            return int(bound[global_key])
        if bound.get(group_key) is not None:
            return dist.get_global_rank(group, int(bound[group_key])) if group is not None else int(bound[group_key])
        return None

    def _wrap_batch(self, fn):
        @functools.wraps(fn)
        def traced(p2p_op_list):
            self._depth += 1
            start = time.perf_counter()
            try:
                out = fn(p2p_op_list)
            finally:
                self._depth -= 1
            seconds = time.perf_counter() - start
            for p in p2p_op_list:
                name = getattr(p.op, "__name__", "isend")
                arg_name, factor = _OPS.get(name, _OPS["isend"])
                ranks = tuple(dist.get_process_group_ranks(p.group)) if p.group is not None \
                    else tuple(range(dist.get_world_size()))
                payload = _nbytes(p.tensor)
                self.records.append(CommRecord(name, ranks, payload, int(payload * factor(len(ranks))),
                                               seconds / len(p2p_op_list), p.peer))
            return out
        return traced

    def _record_c10d(self, namespace, opname, args, seconds):
        if namespace == "c10d":
            if opname not in _C10D:
                return
            name, index, factor = _C10D[opname]
            group = next(a for a in args if isinstance(a, (dist.ProcessGroup, torch.ScriptObject)))
            if not isinstance(group, dist.ProcessGroup):   # the dispatcher passes the group boxed
                group = dist.ProcessGroup.unbox(group)
            ranks = _group_ranks(group)
            payload = _nbytes(args[index]) if index is not None else 0
            peer = None
            if name in ("send", "recv") and opname != "recv_any_source_":
                peer = dist.get_global_rank(group, int(args[2]))
        else:
            if opname not in _FUNCTIONAL:
                return
            name, multiplier, factor = _FUNCTIONAL[opname]
            group = dist.distributed_c10d._resolve_process_group(args[-1])
            ranks = _group_ranks(group)
            payload = _nbytes(args[0]) * multiplier(len(ranks))
            peer = None
        self.records.append(CommRecord(name, ranks, payload, int(payload * factor(len(ranks))), seconds,
                                       peer, via="c10d"))

    # --------------------------------------------------------------------------------- summaries
    def total_bytes(self) -> int:
        return sum(r.wire for r in self.records)

    def counts(self) -> dict:
        out: dict = {}
        for r in self.records:
            out[r.op] = out.get(r.op, 0) + 1
        return out

    def table(self, timings: bool = False) -> str:
        """One line per call; timings are off by default because they differ run to run. Ops seen only at
        the dispatcher (DDP, DTensor) are marked `[c10d]`."""
        lines = []
        for r in self.records:
            line = f"{r.op:<22} group={list(r.ranks)!s:<14} payload={r.payload:>9,d} B  wire={r.wire:>9,d} B"
            if timings:
                line += f"  {r.seconds * 1e3:.3f} ms"
            if r.via != "dist":
                line += f"  [{r.via}]"
            lines.append(line)
        lines.append(f"{'total':<22} {len(self.records)} call(s), {self.total_bytes():,d} B on the wire")
        return "\n".join(lines)
