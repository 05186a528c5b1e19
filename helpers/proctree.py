"""Process trees on Linux, read from /proc: which processes run below which, killing a whole tree, reaping.

Machinery shared by everything in the course that starts processes which start processes: the rank launcher
(helpers/launch.py), the inference server (helpers/course/serving: a replica of tp ranks is a tree, a server
is a session), start_server's launcher and its tests. Where there is no /proc, the walks find nothing and
`alive` falls back to a signal 0.

    info(pid)            Proc(pid, ppid, state, pgid, session), or None once it is gone
    processes()          every process this user can see
    parent(pid)          its parent's pid
    alive(pid)           running or stopped, not gone and not a zombie
    descendants(pid)     every process below it (children, grandchildren, ...)
    kill_tree(pid)       SIGKILL it and everything below it (also ends a process stopped with SIGSTOP)
    kill_group(pgid)     signal a process group (a session leader's group: a server and its replicas)
    reap()               collect this process's children that have exited: [(pid, exit code)]
    wait_gone(pids)      wait until none of them is alive
    die_with_parent()    ask Linux to SIGKILL this process when its parent dies
    set_child_subreaper() orphans below this process become its children, not init's
    set_dumpable(on)     whether other processes of this user may open this one's /proc files (its fds)
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from typing import NamedTuple

PR_SET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 1, 3, 4, 36


class Proc(NamedTuple):
    pid: int
    ppid: int
    state: str      # R running, S sleeping, T stopped, Z zombie, ... (proc(5))
    pgid: int
    session: int


def info(pid: int) -> Proc | None:
    """The process's line of /proc/PID/stat, or None if it is gone (or there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2:].split()   # the command name, in parentheses, may hold spaces
        return Proc(pid, int(fields[1]), fields[0], int(fields[2]), int(fields[3]))
    except (OSError, ValueError, IndexError):
        return None


def processes() -> list[Proc]:
    """Every process visible in /proc (empty where there is none)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    return [p for p in (info(int(e)) for e in entries if e.isdigit()) if p is not None]


def parent(pid: int) -> int | None:
    p = info(pid)
    return None if p is None else p.ppid


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a stopped process counts; a zombie, dead but not yet reaped, does not)."""
    if os.path.isdir("/proc"):
        p = info(pid)
        return p is not None and p.state not in ("Z", "X")
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, parents before their children; empty where there is no /proc."""
    children: dict[int, list[int]] = {}
    for p in processes():
        children.setdefault(p.ppid, []).append(p.pid)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill(pid: int, sig: int = signal.SIGKILL) -> bool:
    """Send `sig` to one process; False if it is gone (or not ours)."""
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Send `sig` (SIGKILL: also to a process stopped by SIGSTOP) to `pid` and every process below it; the tree
    is walked first, so a child does not escape to init when its parent dies. Returns the pids signalled."""
    tree = [pid, *descendants(pid)]
    return [p for p in tree if kill(p, sig)]


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Send `sig` to process group `pgid` (a session leader's pid is its group's id); False if none is left."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_session(proc, grace: float = 30.0) -> None:
    """Stop a subprocess.Popen started in its own session (start_new_session=True) and everything below it:
    SIGTERM its process group (vllm serve shuts its engine core and worker down), then after `grace` seconds
    SIGKILL the group and any process of the tree that left it; reap it and wait until the tree is gone."""
    import subprocess
    tree = [proc.pid, *descendants(proc.pid)]
    kill_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    kill_group(proc.pid, signal.SIGKILL)
    for pid in tree:
        kill(pid)
    proc.wait()
    wait_gone(tree, timeout=10)


def reap(pid: int = -1) -> list[tuple[int, int]]:
    """Collect, without waiting, this process's exited children (`pid`: only that one): [(pid, exit code)], the
    code as subprocess gives it (negative: killed by that signal)."""
    reaped = []
    while True:
        try:
            child, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if child == 0:
            return reaped
        reaped.append((child, os.waitstatus_to_exitcode(status)))
        if pid != -1:
            return reaped


def wait_gone(pids, timeout: float = 5.0) -> list[int]:
    """Wait until none of `pids` is alive (reaping those that are our children); returns those still alive."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if alive(p)]
        for p in pids:
            if p not in left:
                reap(p)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value) == 0
    except OSError:
        return False


def die_with_parent() -> None:
    """Ask Linux to kill this process if the launching process dies (no orphans after a kernel crash)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def set_child_subreaper() -> bool:
    """Orphans of this process's descendants (a child that forks and lets its own child linger, even under
    setsid) become this process's children rather than init's, so a walk of our tree still finds them."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def set_dumpable(on: bool) -> bool | None:
    """Turn this process's "dumpable" flag on or off (prctl PR_SET_DUMPABLE; proc(5)). Off, its /proc/PID
    files belong to root, so no other unprivileged process (a child included) can open /proc/PID/fd/N, a
    way into any pipe or file it holds, nor ptrace it; it also writes no core dump. A fork inherits the flag,
    an exec resets it to on. Returns the previous value (None where there is no prctl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        before = libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
        libc.prctl(PR_SET_DUMPABLE, 1 if on else 0, 0, 0, 0)
    except OSError:
        return None
    return before == 1
