"""Run one Python function on N real processes joined by a torch.distributed process group.

    from helpers import launch

    def demo(rank, world_size):
        t = torch.tensor([rank + 1.0] * 2)
        dist.all_reduce(t)
        print(t)
        return t

    results = launch(demo, world_size=4)      # return values, in rank order

How it works, top to bottom:
  * The parent (your notebook kernel, or pytest) binds a socket on a free port; a small store process
    serves a `TCPStore` on it, the rendezvous point every rank connects to (as torchrun's agent does).
    The OS picks the port, so jobs launched back to back or at once never collide.
  * It forks one process per rank. Fork (not spawn) is what lets a function defined *in a notebook* run
    on every rank: the child already has it in memory, nothing is pickled.
  * Each child points its stdout/stderr at a log file, calls `dist.init_process_group`, runs your function
    and writes its return value (or its exception and traceback) to a result file.
  * The parent waits. When a rank fails it stops the others at once and raises `RankFailed` naming the
    rank that caused it, with its traceback: not a rank that only saw a peer vanish ("Connection closed by
    peer"), but the peer, whether it crashed or its function returned while the others waited in a
    collective; a rank killed by a signal is reported with what it printed as it died (gloo's reason for
    aborting, its Python stack). When the job outlives `timeout` it asks every rank for a stack dump
    (faulthandler on SIGUSR1), stops them and raises `JobTimeout` showing where each rank was stuck.
  * Finally it prints every rank's output, in rank order, prefixed `[rank i]`, so a cell prints the same
    thing on every run (at most the first and last MiB of each rank's output, with a note of what was cut).

The same worker functions run unchanged under torchrun: see helpers/run.py.
"""
from __future__ import annotations

import datetime
import faulthandler
import multiprocessing as mp
import multiprocessing.connection
import os
import linecache
import pickle
import re
import shutil
import socket
import signal
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist

from helpers.proctree import die_with_parent, kill_tree   # noqa: F401 (die_with_parent: also imported from here)

__all__ = ["launch", "rank_device", "init_rank", "default_timeout", "LaunchError", "RankFailed", "JobTimeout",
           "case", "Results"]

# Seconds; a teaching job that runs longer than this is almost always a deadlock. COURSE_TIMEOUT overrides
# it, read at each launch (not at import): the graders' conftest sets it after this module is imported.
DEFAULT_TIMEOUT = 60.0
_GRACE = 3.0            # seconds a rank gets to write its stack dump before it is killed
# A rank's captured output keeps its first and last MiB: a runaway print cannot fill the disk or a notebook.
_OUTPUT_HEAD = _OUTPUT_TAIL = 1 << 20


def default_timeout() -> float:
    """The job timeout when launch() is given none: COURSE_TIMEOUT seconds if set, else 60."""
    value = os.environ.get("COURSE_TIMEOUT")
    if value is None or value.strip() == "":
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise ValueError(f"COURSE_TIMEOUT={value!r} must be a positive number of seconds")
    return seconds


class LaunchError(RuntimeError):
    """Base class of the errors a distributed job raises in the launching process."""


class RankFailed(LaunchError):
    """A rank raised an exception, exited early or was killed.

    Attributes: rank, exc_type (name of the exception class raised on that rank, or None when the process
    died without raising), message, remote_traceback, exitcode, outputs (every rank's captured output).
    """

    def __init__(self, rank, exc_type, message, remote_traceback, exitcode, outputs, traceback_rank=None):
        self.rank, self.exc_type, self.message = rank, exc_type, message
        self.remote_traceback, self.exitcode, self.outputs = remote_traceback, exitcode, outputs
        if exc_type is not None:
            head = f"rank {rank} raised {exc_type}: {message}"
        else:
            head = f"rank {rank} {message}"
        # traceback_rank: whose traceback it is, when it is not the blamed rank's (a peer left early).
        whose = f"rank {rank}" if traceback_rank is None else f"rank {traceback_rank}, which waited for it"
        body = f"\n\n--- traceback of {whose} ---\n{remote_traceback.rstrip()}" if remote_traceback else ""
        super().__init__(head + body + "\n\nThe other ranks were stopped.")


class JobTimeout(LaunchError):
    """The job ran past its timeout (usually a deadlock: ranks waiting on different collectives).

    Attributes: timeout, stacks (rank -> the Python stack that rank was executing), outputs.
    """

    def __init__(self, timeout, stacks, outputs):
        self.timeout, self.stacks, self.outputs = timeout, stacks, outputs
        parts = [f"the job did not finish within timeout={timeout:g} s; every rank was stopped. "
                 "Where each rank was stuck (innermost call last):"]
        for rank, stack in sorted(stacks.items()):
            parts.append(f"--- rank {rank} ---\n{stack}")
        super().__init__("\n".join(parts))


class Results(list):
    """The return values of a job, in rank order. `.outputs[i]` is rank i's printed text, `.seconds` the
    wall time of the whole job (start of the first process to end of the last)."""

    outputs: list[str]
    seconds: float


# ----------------------------------------------------------------------------------------------- launch

def launch(fn: Callable[..., Any], world_size: int, *args, backend: str | None = None,
           timeout: float | None = None, threads: int | None = None, show_output: bool = True,
           **kwargs) -> Results:
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` processes and return its results.

    backend: 'gloo' or 'nccl' (default: nccl if at least world_size GPUs are visible, else gloo).
    timeout: seconds before the job is declared hung; raises JobTimeout with every rank's stack.
    threads: torch threads per rank (default 1). Forked ranks use one thread because torch's OpenMP
        runtime (libgomp) is not fork-safe: once the launching process has run a multi-threaded op, a
        forked child's first multi-threaded op hangs. PyTorch's DataLoader workers use 1 for the same
        reason. Pass more only from a process that has not computed with torch yet.
    show_output: print each rank's output after the job, as `[rank i] ...` lines in rank order.
    Raises RankFailed when a rank raises or dies; the other ranks are stopped either way.
    """
    timeout = default_timeout() if timeout is None else timeout
    threads = 1 if threads is None else threads
    backend = _check_arguments(fn, world_size, backend, timeout)

    # Bind the rendezvous socket before forking: port 0 lets the OS pick a free port, and holding it open
    # means no other job can take it. A store process serves the TCPStore on it (see _serve_store).
    listener = socket.create_server(("127.0.0.1", 0), backlog=max(128, 2 * world_size))
    workdir = tempfile.mkdtemp(prefix="dil-job-")
    ctx = mp.get_context("fork")
    store_proc = ctx.Process(target=_serve_store, name="store", daemon=True, args=(listener, timeout))
    procs = [ctx.Process(target=_rank_main, name=f"rank{r}", daemon=True,
                         args=(fn, r, world_size, backend, listener, workdir, threads, timeout, args, kwargs))
             for r in range(world_size)]
    start = time.perf_counter()
    sys.stdout.flush()
    sys.stderr.flush()
    logs = _Logs(workdir, world_size)
    try:
        store_proc.start()
        for p in procs:
            p.start()
        listener.close()
        failure = _wait(procs, workdir, timeout, start, logs)
        seconds = time.perf_counter() - start
        outputs = [logs.read(r) for r in range(world_size)]
        if show_output:
            _print_outputs(outputs)
        if failure is not None:
            if failure[0] == "timeout":
                raise JobTimeout(timeout, failure[1], outputs) from None
            raise RankFailed(*failure[:5], outputs=outputs, traceback_rank=failure[5]) from None
        results = Results()
        for r in range(world_size):
            try:
                results.append(_load(workdir, r)[1])
            except _Unloadable as exc:
                raise RankFailed(r, None, f"returned a value that cannot be unpickled in the launching process "
                                 f"({exc}); return tensors, numbers, strings or containers of them",
                                 "", 0, outputs) from None
        results.outputs, results.seconds = outputs, seconds
        return results
    finally:
        _stop(procs + [store_proc])
        listener.close()
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------------------------- per rank

def rank_device() -> torch.device:
    """The device this rank computes on: its own GPU under NCCL, else the CPU. Works under torchrun too."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_rank(backend: str, local_rank: int, local_world_size: int, threads: int | None = None) -> None:
    """Per-rank setup shared by launch() and torchrun (helpers/run.py): device and thread count
    (default: the cores divided among the ranks of this node)."""
    if backend == "nccl":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # One pool of cores shared by all local ranks: more threads than cores only adds contention.
    # (launch() passes threads=1: see its docstring on OpenMP and fork.)
    torch.set_num_threads(threads or max(1, cores // local_world_size))


def _to_cpu(value):
    """Move tensors to the CPU so the parent never has to touch CUDA (which would break later forks)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_to_cpu(v) for v in value)
    if isinstance(value, dict) and type(value) is dict:
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _rank_main(fn, rank, world_size, backend, listener, workdir, threads, timeout, args, kwargs):
    """Body of one forked rank. Never returns: it ends with os._exit so the parent's atexit handlers,
    open notebook sockets and buffered output are not touched by the child."""
    die_with_parent()
    log = os.open(os.path.join(workdir, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    sys.stdin = open(os.devnull)
    faulthandler.enable(file=sys.stderr)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=False)
    signal.signal(signal.SIGINT, signal.SIG_DFL)

    port = listener.getsockname()[1]
    listener.close()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code, payload = 0, None
    try:
        init_rank(backend, rank, world_size, threads)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        # Start the user's function only once every rank's process group is complete: a rank that fails at
        # once must not vanish while a slower peer is still connecting (it would log connection errors).
        if store.add("launch/ready", 1) == world_size:
            store.set("launch/go", "1")
        store.wait(["launch/go"])
        payload = ("ok", _to_cpu(fn(rank, world_size, *args, **kwargs)))
    except BaseException as exc:  # SystemExit and KeyboardInterrupt included: report them all
        code = 1
        payload = ("error", type(exc).__name__, with_notes(exc), _user_traceback(exc), time.time())
    try:
        _write_result(workdir, rank, payload)
    except Exception as exc:  # e.g. the function returned something that cannot be pickled
        code = 1
        _write_result(workdir, rank, ("error", "ResultNotPicklable",
                                      f"the return value of rank {rank} could not be sent back: {exc}", "",
                                      time.time()))
    try:
        if code == 0 and dist.is_initialized():
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _write_result(workdir, rank, payload):
    """Write then rename, so the parent never reads half a result (it may look while the rank still runs)."""
    path = os.path.join(workdir, f"rank{rank}.result")
    with open(path + ".tmp", "wb") as f:
        pickle.dump(payload, f)
    os.replace(path + ".tmp", path)


def _serve_store(listener, timeout):
    """The rendezvous store's own process, alive for the whole job like torchrun's agent. Kept out of the
    ranks so that a rank that dies early never takes the store down under the others (who would then
    print connection errors), and out of the parent because forking beside a store thread can deadlock."""
    die_with_parent()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    store = dist.TCPStore("127.0.0.1", listener.getsockname()[1], is_master=True, wait_for_workers=False,
                          master_listen_fd=listener.fileno(), timeout=datetime.timedelta(seconds=timeout))
    while True:  # serve until the parent stops the job
        signal.pause()
    del store


def with_notes(exc: BaseException) -> str:
    """str(exc) followed by its notes (`exc.add_note`, e.g. the case a grader was checking: see `case`)."""
    notes = [str(n) for n in getattr(exc, "__notes__", ()) or ()]
    first, newline, rest = str(exc).partition("\n")         # on the first line: a report may keep only that one
    return first + "".join(f" [{note}]" for note in notes) + newline + rest


class case:
    """`with case("SUM of a non-contiguous tensor"): ...` — an exception raised inside gets a note naming the
    case, and the note travels with it out of a rank (RankFailed's message) and into the grader's reason: a
    learner reads which input broke their code, not only the error."""

    def __init__(self, description: str):
        self.description = description

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # A stub's NotImplementedError needs no case: the exercise is not started, whatever the input.
        if isinstance(exc, Exception) and not isinstance(exc, NotImplementedError) and \
                f"case: {self.description}" not in getattr(exc, "__notes__", ()):
            exc.add_note(f"case: {self.description}")
        return False


def _user_traceback(exc: BaseException) -> str:
    """The traceback from the user's function down, without the launcher's own frames."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


# ------------------------------------------------------------------------------------------ the parent

def default_backend(world_size: int) -> str:
    """NCCL with one GPU per rank when enough GPUs are visible, else gloo on the CPU."""
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"


def _check_arguments(fn, world_size, backend, timeout) -> str:
    """Reject bad input with a message that says what to do; returns the backend to use."""
    if not callable(fn):
        raise TypeError(f"launch() runs a function on every rank; got {fn!r} ({type(fn).__name__}), "
                        "which is not callable. Pass the function itself: launch(demo, 4), not launch(demo(), 4).")
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise TypeError(f"world_size must be a whole number of processes, got {world_size!r}")
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: a job needs at least one process (world_size >= 1)")
    if world_size > 64:
        raise ValueError(f"world_size={world_size} processes on one machine is more than this launcher "
                         "allows (64); use torchrun across machines for bigger jobs")
    backend = backend or default_backend(world_size)
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r}: use 'gloo' (CPU) or 'nccl' (one GPU per rank)")
    if backend == "nccl":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n < world_size:
            raise ValueError(f"backend='nccl' needs one GPU per rank: world_size={world_size} but {n} GPU(s) "
                             "are visible. Use backend='gloo' or fewer ranks.")
        if torch.cuda.is_initialized():
            raise RuntimeError("CUDA is already initialised in this process, so it cannot fork GPU ranks. "
                               "Restart the kernel and keep CUDA work inside the launched function.")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout={timeout!r} must be a positive number of seconds")
    return backend


def _wait(procs, workdir, timeout, start, logs):
    """Wait for every rank. Returns None on success, ("timeout", stacks) on a hang, or the arguments of
    RankFailed for the rank that failed first."""
    pending = _exit_handles(procs)
    failed = {}  # rank -> wall-clock time its failure was noticed
    try:
        while pending:
            left = timeout - (time.perf_counter() - start)
            if left <= 0:
                return "timeout", _dump_stacks(procs, workdir)
            for handle in mp.connection.wait(list(pending), timeout=min(left, 0.5)):
                rank = pending.pop(handle)
                if isinstance(handle, int) and handle != procs[rank].sentinel:
                    os.close(handle)
                procs[rank].join()
                if procs[rank].exitcode != 0 or not os.path.exists(os.path.join(workdir, f"rank{rank}.result")):
                    failed[rank] = time.time()  # exit code 0 with no result: os._exit(0) in the user's code
            logs.cap()
            if failed:
                # Let ranks that fail in the same instant report too, then blame the root cause.
                time.sleep(0.05)
                for sentinel, rank in list(pending.items()):
                    if procs[rank].exitcode not in (None, 0):
                        failed[rank] = time.time()
                return _describe_failure(procs, workdir, failed, logs)
    except KeyboardInterrupt:
        _stop(procs)
        raise
    finally:
        for handle, rank in pending.items():
            if handle != procs[rank].sentinel:
                os.close(handle)
    return None


def _exit_handles(procs):
    """{waitable: rank}, ready when the rank's process ends. On Linux a pidfd: multiprocessing's sentinel is a
    pipe that a child forked by the rank inherits, so a rank whose code forks (a lab module that leaves a
    process behind) would look alive until that child exits."""
    handles = {}
    for rank, p in enumerate(procs):
        handle = p.sentinel
        if hasattr(os, "pidfd_open"):
            try:
                handle = os.pidfd_open(p.pid)
            except OSError:
                pass
        handles[handle] = rank
    return handles


# Errors a rank sees only because a peer vanished: never the root cause when another rank failed too.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def _describe_failure(procs, workdir, failed, logs):
    """The arguments of RankFailed for the rank that caused the failure: a rank that raised or died on its
    own, else a rank whose function returned while the failed ranks still waited for it in a collective."""
    reports = []
    for rank, noticed in failed.items():
        try:
            result = _load(workdir, rank)
        except _Unloadable:
            result = None
        code = procs[rank].exitcode
        if result and result[0] == "error":
            _, exc_type, message, tb, when = result
        else:
            exc_type, when = None, noticed
            if code is not None and code < 0:
                message = f"was killed by signal {signal.Signals(-code).name}"
            else:
                message = f"exited with code {code} before its function returned (os._exit or a crash)"
            cause, tb = _crash_cause(logs.read(rank))
            message += cause
        secondary = exc_type is not None and any(s in message for s in _PEER_GONE)
        reports.append(((secondary, when, rank), (rank, exc_type, message, tb, code)))
    (secondary, _, victim), first = min(reports)
    returned = [r for r in range(len(procs)) if r not in failed and _returned(workdir, r)]
    if secondary and returned:
        # The peer that "crashed" did not crash: its function ended, closing its connections, while this
        # rank still waited for it in a collective. Blame the rank that left.
        tb = first[3]
        where = _collective_in(tb)
        also = ", ".join(map(str, returned[1:]))
        message = f"returned while rank {victim} waited in {where}" if not also else \
            f"returned (so did rank{'s' if len(returned) > 2 else ''} {also}) while rank {victim} waited in {where}"
        seen = next((s for s in _PEER_GONE if s in first[2]), first[2])
        message += (f" (rank {victim} saw \"{seen}\"). Every rank must call the same collectives in the same "
                    f"order: this rank's function ended without calling the "
                    f"{where if where != 'a collective' else 'collective'} that rank {victim} was waiting in")
        return returned[0], None, message, tb, 0, victim
    return (*first, None)


def _returned(workdir, rank) -> bool:
    """Whether this rank's function returned normally (its result file says ok)."""
    try:
        result = _load(workdir, rank)
    except _Unloadable:
        return True  # it returned; only the value cannot be read here
    return bool(result) and result[0] == "ok"


def _collective_in(text: str) -> str:
    """The torch.distributed call a rank was inside, from its traceback (outermost first)."""
    calls = re.findall(r'distributed_c10d\.py", line \d+, in (\w+)', text)
    return calls[-1] if calls else "a collective"


def _crash_cause(log: str) -> tuple[str, str]:
    """(": the reason", stack) for a rank that died without raising, from what it printed as it died:
    a C++ exception's what() (gloo: "Received data size doesn't match expected size") and faulthandler's
    dump of the Python stack. Both are in the rank's output, which graders do not show."""
    cause = ""
    what = re.findall(r"what\(\):\s*(.+)", log)
    if what:
        cause = re.sub(r"^\[enforce fail at [^\]]*\]\s*", "", what[-1].strip())
    elif "Fatal Python error:" in log:
        cause = log.split("Fatal Python error:")[-1].splitlines()[0].strip()
    stack = ""
    if "(most recent call first):" in log:
        dump = log.split("(most recent call first):")[-1].split("\n\n")[0]
        stack = _format_stack(dump)
        calls = re.findall(r'distributed_c10d\.py", line \d+ in (\w+)', dump)
        if calls:
            cause = f"in {calls[0]}" + (f": {cause}" if cause else "")
        stack = "Stack when it died (innermost call last):\n" + stack
    if cause and "doesn't match expected size" in cause:
        cause += " (the ranks passed tensors of different sizes to the same collective)"
    return (f" {cause}" if cause.startswith("in ") else f": {cause}") if cause else "", stack


def _dump_stacks(procs, workdir):
    """SIGUSR1 makes faulthandler in each live rank write its Python stack to the rank's log."""
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    sizes = {r: os.path.getsize(os.path.join(workdir, f"rank{r}.log")) for r in alive}
    for r in alive:
        try:
            os.kill(procs[r].pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
    # faulthandler writes the dump from inside the signal handler; on a loaded machine that can take a
    # moment, so wait until every rank's log has grown (or the grace period ends).
    deadline = time.monotonic() + _GRACE
    while time.monotonic() < deadline:
        if all(os.path.getsize(os.path.join(workdir, f"rank{r}.log")) > sizes[r] or not procs[r].is_alive()
               for r in alive):
            time.sleep(0.05)  # the dump is written in several pieces
            break
        time.sleep(0.02)
    stacks = {}
    for r in alive:
        with open(os.path.join(workdir, f"rank{r}.log"), errors="replace") as f:
            f.seek(sizes[r])
            stacks[r] = _format_stack(f.read())
        _truncate_log(os.path.join(workdir, f"rank{r}.log"), sizes[r])
    for r, p in enumerate(procs):
        if r not in stacks:
            stacks[r] = f"(had already exited with code {p.exitcode})"
    return stacks


def _format_stack(dump: str) -> str:
    """faulthandler lists the innermost frame first. Show the frames from the rank's own function inwards,
    outermost first, each with its source line, as a traceback reads."""
    frames = []
    for line in reversed(dump.splitlines()):
        m = re.match(r'\s*File "(.*)", line (\d+) in (.*)', line)
        if m:
            frames.append((m[1], int(m[2]), m[3]))
    entry = [i for i, (path, _, func) in enumerate(frames) if path == __file__ and func == "_rank_main"]
    if entry:
        frames = frames[entry[-1] + 1:]
    lines = []
    for path, lineno, func in frames:
        if path.endswith("c10d_logger.py"):
            continue  # torch's logging wrapper around every collective: noise here
        lines.append(f'  File "{os.path.basename(path)}", line {lineno}, in {func}')
        code = linecache.getline(path, lineno).strip()
        if code:
            lines.append(f"    {code}")
    return "\n".join(lines) or "  (no Python frame: stuck inside native code)"


def _truncate_log(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def _stop(procs):
    """Terminate, then kill, every rank still alive, with whatever it forked (helpers.proctree.kill_tree); reap
    them all so none is left behind."""
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 1.0
    for p in procs:
        if p.pid is not None:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                kill_tree(p.pid)
                p.join()


class _Unloadable(Exception):
    """A rank's result file exists but cannot be unpickled in this process."""


def _load(workdir, rank):
    """The rank's ("ok", value) or ("error", ...) record; None if it wrote none; _Unloadable if unreadable."""
    try:
        with open(os.path.join(workdir, f"rank{rank}.result"), "rb") as f:
            return pickle.load(f)
    except FileNotFoundError:
        return None
    except Exception as exc:  # unpickling runs the value's own code: any error can come out of it
        raise _Unloadable(f"{type(exc).__name__}: {exc}") from None


class _Logs:
    """Each rank's output file, kept to its first and last _OUTPUT_HEAD/_OUTPUT_TAIL bytes. cap() runs while
    the job runs: it saves the head, keeps the latest tail and empties the file (ranks append with O_APPEND,
    so their next write lands at the new end)."""

    def __init__(self, workdir, world_size):
        self.paths = [os.path.join(workdir, f"rank{r}.log") for r in range(world_size)]
        self.head: dict[int, bytes] = {}
        self.tail: dict[int, bytes] = {}
        self.omitted: dict[int, int] = {}

    def cap(self):
        for rank, path in enumerate(self.paths):
            try:
                if os.path.getsize(path) <= 2 * (_OUTPUT_HEAD + _OUTPUT_TAIL):
                    continue
                with open(path, "r+b") as f:
                    data = f.read()
                    f.truncate(0)
            except OSError:
                continue
            if rank not in self.head:
                self.head[rank], data = data[:_OUTPUT_HEAD], data[_OUTPUT_HEAD:]
            kept = self.tail.get(rank, b"") + data
            self.omitted[rank] = self.omitted.get(rank, 0) + max(0, len(kept) - _OUTPUT_TAIL)
            self.tail[rank] = kept[-_OUTPUT_TAIL:]

    def read(self, rank) -> str:
        try:
            with open(self.paths[rank], "rb") as f:
                data = f.read()
        except OSError:
            data = b""
        head, omitted = self.head.get(rank), self.omitted.get(rank, 0)
        if head is None:
            if len(data) <= _OUTPUT_HEAD + _OUTPUT_TAIL:
                return data.decode(errors="replace")
            head, data = data[:_OUTPUT_HEAD], data[_OUTPUT_HEAD:]
        data = self.tail.get(rank, b"") + data
        omitted += max(0, len(data) - _OUTPUT_TAIL)
        data = data[-_OUTPUT_TAIL:]
        note = (f"\n[... {omitted} bytes of this rank's output omitted: the launcher keeps the first and last "
                f"{_OUTPUT_TAIL >> 20} MiB ...]\n")
        return head.decode(errors="replace") + note + data.decode(errors="replace")


def _print_outputs(outputs):
    for rank, text in enumerate(outputs):
        for line in text.splitlines():
            print(f"[rank {rank}] {line}")
    sys.stdout.flush()
