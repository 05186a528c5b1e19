"""Grade the exercises: `make grade`, or `python -m helpers.grade [CHAPTER] [--json FILE] [--submission DIR]`.

Every grader test (in tests/graders/test_chNN_*.py) carries `@pytest.mark.exercise("1.2", "Ring all-gather")`. The
grade is recorded by a parent process in which no learner code ever runs:

  * The parent reads the grader files as text (`ast`), never importing them, and lists the tests each
    exercise must report, with the number of parametrised cases where the file states them literally.
  * Each grader file runs in a child pytest (this module is its plugin, `-p helpers.grade`), in a session
    of its own, with `solutions/` unimportable unless the reference itself is graded. The child writes one
    JSON line per event (collected, test started, test outcome, finished) into a one-way Unix socket that
    only it holds: no path to it is in any command line, environment or file, and unlike a pipe or a file
    it cannot be opened again through /proc/PID/fd; before any learner code is imported the child makes
    it close-on-exec, closes it in every process it forks (the ranks), and makes itself non-dumpable, so
    that no other process of the user can take a copy (pidfd_getfd, ptrace; the parent is non-dumpable
    too while it grades). Root can; grade as an unprivileged user.
  * The parent trusts only what it checks: an exercise passes when the child finished its session and
    exited with the status it reported, its events read as one session (one collection of exactly the
    tests asked for, each started once, each result while its test runs, "finished" last), and every test
    of the exercise reported exactly once and passed. A child that dies (os._exit, a signal, the OOM
    killer) fails the exercise whose test was running; every other exercise it had not failed, passed
    ones included, runs again in a new child. Every process a child started is killed before the parent
    reads the last events, and only the parent writes the table, the JSON report and the exit status.
  * One limit remains: the graders call learner code inside the child pytest itself, and code running in a
    process can do anything that process can (write a consistent stream of passes into its socket and exit
    with status 0). Tampering of that kind is aimed at one chapter's child, is visible in the learner's
    code, and is for an instructor's review; no other chapter, the table or the report can be touched.

A stub raises `NotImplementedError("Exercise 1.2: ...")`; when that error reaches the test (directly, or
from inside a rank via RankFailed) the exercise is "not started".

Instructors: `--submission DIR` grades DIR/labs alone against this course's graders at a commit
(`--ref`, default HEAD), in a temporary checkout made with `git archive`, without `solutions/`. `--class PATH
--out FILE.csv` grades a whole class that way, one learner after the other, one row per learner per exercise.
"""
from __future__ import annotations

import argparse
import ast
import io
import json
import os
import pathlib
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

import pytest

from helpers import proctree

ROOT = pathlib.Path(__file__).resolve().parent.parent
PASSED, FAILED, NOT_STARTED, SKIPPED = "passed", "failed", "not started", "skipped"
_REASON_LIMIT = 1000   # characters of a failure reason kept in the table and the JSON report


# =============================================================== the child: a pytest plugin (`-p helpers.grade`)

def _is_stub_error(excinfo) -> bool:
    """A stub's NotImplementedError reached the test: raised, from a rank, or inside a grader's own message."""
    from helpers.launch import RankFailed
    exc, seen = excinfo.value, set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, NotImplementedError) or \
                isinstance(exc, RankFailed) and exc.exc_type == "NotImplementedError":
            return True
        exc = exc.__cause__ or exc.__context__
    return re.search(r"NotImplementedError: Exercise \d+\.\d+: ", str(excinfo.value)) is not None


def shorten(text: str, limit: int = _REASON_LIMIT) -> str:
    """Fit a failure message in `limit` characters without losing the part that differs: long lists and
    tensors inside it are cut in their middle first, then the message itself in its middle."""
    def cut(match):
        s = match.group(0)
        return s[:60] + " … " + s[-40:]
    for _ in range(3):
        if len(text) <= limit:
            break
        text = re.sub(r"[\[(][^\[\]()]{160,}[\])]", cut, text)
    if len(text) > limit:
        half = (limit - 3) // 2
        text = text[:half] + " … " + text[-half:]
    return text


def where_stuck(stacks: dict) -> str:
    """One line from a hung job's stacks (JobTimeout.stacks: rank -> stack, innermost call last): where each
    rank was, e.g. "rank 0 in recv (from ring_pass line 12); rank 1 in send (from ring_pass line 11)"."""
    parts = []
    for rank, stack in sorted(stacks.items()):
        frames = re.findall(r'File "[^"]*", line (\d+), in (\S+)', stack)
        if frames:
            outer = f" (from {frames[-2][1]} line {frames[-2][0]})" if len(frames) > 1 else ""
            parts.append(f"rank {rank} in {frames[-1][1]}{outer}")
        else:
            parts.append(f"rank {rank}: no stack")
    return "; ".join(parts)


def condense(text: str, typename: str = "") -> str:
    """The line of a failure message that the table shows: its first line; a bare `assert`'s next line
    (where pytest says the values differ); when the first line announces more ("...:"), what follows it, on
    the same line (a hung job's stacks as one `where_stuck` line); then `shorten`."""
    if "Where each rank was stuck" in text:
        head, _, body = text.partition("Where each rank was stuck")
        sections = re.split(r"^--- rank (\d+) ---$", body, flags=re.M)
        stacks = {int(sections[i]): sections[i + 1] for i in range(1, len(sections) - 1, 2)}
        text = head.strip() + " Where each rank was stuck: " + (where_stuck(stacks) or "no stack was recorded")
    lines = [line for line in text.strip().splitlines() if line.strip()] or [typename or "failed"]
    first = lines[0]
    if first.startswith("assert ") and len(lines) > 1:
        first += " — " + lines[1].strip()  # a bare assert: pytest's next line says where the values differ
    elif first.rstrip().endswith(":") and len(lines) > 1:
        first = first.rstrip() + " " + " / ".join(line.strip() for line in lines[1:6])
    return shorten(first)


def _raised_at(excinfo) -> str:
    """' (raised in labs/x.py line 12, in f)': where an error other than an assertion came from, so that a bare
    "IndexError: list index out of range" says whose indexing it was (the learner's code or the grader's)."""
    try:
        entry = excinfo.traceback[-1]
        path = pathlib.Path(str(entry.path)).resolve()
        where = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
        return f" (raised in {where} line {entry.lineno + 1}, in {entry.name})"
    except (AttributeError, IndexError, OSError, ValueError):
        return ""


def _reason(excinfo) -> str:
    """The useful part of a failure: the assertion message, or which rank failed and why."""
    from helpers.launch import JobTimeout, RankFailed
    exc = excinfo.value
    if isinstance(exc, RankFailed):
        text = f"rank {exc.rank} " + (f"raised {exc.exc_type}: {exc.message}" if exc.exc_type else exc.message)
        frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', exc.remote_traceback or "")
        if exc.exc_type in ("IndexError", "KeyError", "TypeError", "AttributeError") and frames:
            path, line, name = frames[-1]    # a bare error: say whose code it came from
            text += f" (raised in {pathlib.Path(path).name} line {line}, in {name})"
    elif isinstance(exc, JobTimeout):
        text = f"hung: the job did not finish within {exc.timeout:g} s (ranks waiting on each other?). " \
               f"Where each rank was stuck: {where_stuck(exc.stacks) or 'no stack was recorded'}"
    elif excinfo.typename == "Failed" and "Timeout" in str(exc):
        text = "timed out (pytest-timeout): the exercise never returned"
    elif isinstance(exc, AssertionError):
        text = str(exc) or "assertion failed"
    else:
        text = f"{excinfo.typename}: {exc}{_raised_at(excinfo)}"
    notes = [str(n) for n in getattr(exc, "__notes__", ()) or ()]       # e.g. the case: helpers.launch.case
    if notes and not isinstance(exc, RankFailed):
        first, _, rest = text.strip().partition("\n")
        text = first + "".join(f" [{n}]" for n in notes) + ("\n" + rest if rest else "")
    return condense(text, excinfo.typename)


class _NoReference:
    """Import hook installed in the child before any learner code runs: the reference answers (solutions/)
    cannot be imported while another package is graded (also not through the editable install's finder)."""

    def __init__(self, impl):
        self.impl = impl

    def find_spec(self, name, path=None, target=None):
        if name == "solutions" or name.startswith("solutions."):
            raise ModuleNotFoundError(
                f"No module named {name!r}: the reference answers (solutions/) cannot be imported while "
                f"{self.impl}/ is graded; the grade counts your own code", name=name)
        return None


class GradePlugin:
    def __init__(self, fd: int, exercises: set[str] | None):
        self.exercises = exercises
        self.failed: set[str] = set()
        self.fd = fd

    def _emit(self, **event):
        os.write(self.fd, (json.dumps(event) + "\n").encode())  # one write per line: lines never interleave

    @pytest.hookimpl
    def pytest_collection_modifyitems(self, config, items):
        keep, drop = [], []
        for item in items:
            mark = item.get_closest_marker("exercise")
            ok = mark is not None and (self.exercises is None or str(mark.args[0]) in self.exercises)
            (keep if ok else drop).append(item)
        items[:] = keep
        config.hook.pytest_deselected(items=drop)
        self._emit(event="collected", tests=[item.nodeid for item in keep])

    @pytest.hookimpl
    def pytest_runtest_logstart(self, nodeid, location):
        self._emit(event="start", test=nodeid)

    @pytest.hookimpl
    def pytest_runtest_setup(self, item):
        # The first failing test decides an exercise: skip the rest (a hanging stub costs one timeout, not ten).
        mark = item.get_closest_marker("exercise")
        if mark is not None and str(mark.args[0]) in self.failed:
            pytest.skip(f"exercise {mark.args[0]} already failed")

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        mark = item.get_closest_marker("exercise")
        if mark is None or report.when == "teardown" and report.passed:
            return report
        if report.when == "setup" and report.passed:
            return report
        if report.passed:
            status, reason = PASSED, ""
        elif report.skipped:
            status, reason = SKIPPED, str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
        elif call.excinfo is not None and _is_stub_error(call.excinfo):
            status, reason = NOT_STARTED, _reason(call.excinfo)
        else:
            status = FAILED
            reason = _reason(call.excinfo) if call.excinfo is not None else shorten(str(report.longrepr))
        if status in (FAILED, NOT_STARTED):
            self.failed.add(str(mark.args[0]))
        self._emit(event="result", test=item.nodeid, when=report.when, status=status, reason=reason)
        return report

    def pytest_sessionfinish(self, session, exitstatus):
        self._emit(event="finished", exitstatus=int(exitstatus))


def pytest_addoption(parser):
    parser.addoption("--grade-report-fd", type=int, default=None,
                     help="write grading events (JSON lines) to this inherited socket")
    parser.addoption("--grade-exercises", default=None, help="comma-separated exercise ids to run")
    parser.addoption("--grade-block-reference", default=None, metavar="IMPL",
                     help="make solutions/ unimportable (IMPL, the package graded, names it in the error)")


def _guard_report_channel(fd: int) -> None:
    """Keep the events socket away from every other process, before any learner code is imported: it is not
    inherited across exec (close-on-exec), a forked child (a rank, the store, a process a lab forks) closes
    it at once, and this process is made non-dumpable, so that no other process of the user can copy it out
    of this one (pidfd_getfd and ptrace need a dumpable target). A forked child is made dumpable again (the
    parent must read its environment to find it if it lingers): it holds no socket."""
    os.set_inheritable(fd, False)
    owner = os.getpid()

    def close_in_child():
        if os.getppid() != owner:   # a grandchild: its parent closed the socket; the number may be reused
            return
        try:
            os.close(fd)
        except OSError:
            pass
        proctree.set_dumpable(True)

    os.register_at_fork(after_in_child=close_in_child)
    proctree.set_dumpable(False)


def pytest_configure(config):
    impl = config.getoption("--grade-block-reference")
    if impl:
        sys.meta_path.insert(0, _NoReference(impl))
    fd = config.getoption("--grade-report-fd")
    if fd is not None:
        _guard_report_channel(fd)
        ids = config.getoption("--grade-exercises")
        config.pluginmanager.register(GradePlugin(fd, set(ids.split(",")) if ids else None), "grade-plugin")


# ============================================================ the parent: what must be reported (read as text)

class Exercise:
    """One exercise as the grader files state it: id, title, grader file and its test functions with the
    number of parametrised cases each must report (None where the file does not state it literally)."""

    def __init__(self, exercise_id, title, file, optional=False):
        self.id, self.title, self.file, self.optional = exercise_id, title, file, optional
        self.tests: dict[str, int | None] = {}

    def __repr__(self):
        return f"Exercise({self.id!r}, {self.file!r}, {self.tests})"


def _dotted(node) -> str:
    if isinstance(node, ast.Attribute):
        return _dotted(node.value) + "." + node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _count(node, names, depth=0):
    """How many values a parametrize argument holds, when the file states it literally."""
    if depth > 5:
        return None
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return None if any(isinstance(e, ast.Starred) for e in node.elts) else len(node.elts)
    if isinstance(node, ast.Dict):
        return len(node.keys) if None not in node.keys else None
    if isinstance(node, ast.Name) and node.id in names:
        return _count(names[node.id], names, depth + 1)
    if isinstance(node, ast.Call) and _dotted(node.func) in ("sorted", "list", "tuple") and len(node.args) == 1 \
            and not node.keywords:
        return _count(node.args[0], names, depth + 1)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and not node.args \
            and node.func.attr in ("keys", "values", "items"):
        return _count(node.func.value, names, depth + 1)
    if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp)) and \
            all(not g.ifs and not g.is_async for g in node.generators) and not isinstance(node, ast.SetComp):
        total = 1
        for g in node.generators:
            n = _count(g.iter, names, depth + 1)
            if n is None:
                return None
            total *= n
        return total
    return None


def collect(root: pathlib.Path = ROOT, chapter: str | None = None) -> list[Exercise]:
    """The exercises of the grader files under root/tests/graders, read with ast (no grader or lab is imported)."""
    pattern = f"test_ch{int(chapter):02d}_*.py" if chapter is not None else "test_ch*.py"
    exercises: dict[str, Exercise] = {}
    for path in sorted((root / "tests" / "graders").glob(pattern)):
        tree = ast.parse(path.read_text(), str(path))
        names = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                 for t in node.targets if isinstance(t, ast.Name)}
        names.update({node.target.id: node.value for node in tree.body if isinstance(node, ast.AnnAssign)
                      and isinstance(node.target, ast.Name) and node.value is not None})
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.name.startswith("test"):
                continue
            mark, count = None, 1
            for dec in node.decorator_list:
                if not isinstance(dec, ast.Call):
                    continue
                name = _dotted(dec.func)
                if name.endswith("mark.exercise") and dec.args and isinstance(dec.args[0], ast.Constant):
                    title = dec.args[1].value if len(dec.args) > 1 and isinstance(dec.args[1], ast.Constant) else ""
                    optional = any(k.arg == "optional" and isinstance(k.value, ast.Constant) and k.value.value is True
                                   for k in dec.keywords)
                    mark = (str(dec.args[0].value), str(title), optional)
                elif name.endswith("mark.parametrize"):
                    values = dec.args[1] if len(dec.args) > 1 else next(
                        (k.value for k in dec.keywords if k.arg == "argvalues"), None)
                    n = _count(values, names) if values is not None else None
                    count = None if n is None or count is None else count * n
            if mark is None:
                continue
            rel = path.relative_to(root).as_posix()
            ex = exercises.setdefault(mark[0], Exercise(mark[0], mark[1], rel, mark[2]))
            ex.optional = ex.optional or mark[2]
            ex.tests[f"{rel}::{node.name}"] = count
    return [exercises[k] for k in sorted(exercises, key=_exercise_key)]


def _exercise_key(ex_id):
    return tuple(int(p) if p.isdigit() else p for p in ex_id.split("."))


def _function_of(nodeid: str) -> str:
    """The test function of a node id, without its parameters:
    tests/graders/test_ch00_warmup.py::test_sum_of_ranks[4] -> tests/graders/test_ch00_warmup.py::test_sum_of_ranks"""
    return nodeid.split("[", 1)[0]


# ================================================== the parent: copying the reference is not an answer

def borrowed_reference(root: pathlib.Path, impl: str) -> dict[str, str]:
    """Modules of the graded package that use the reference answers: {module: "labs/x.py line N: ..."}."""
    if impl == "solutions" or impl.startswith("solutions."):
        return {}
    package = root.joinpath(*impl.split("."))
    found = {}
    for path in sorted(package.rglob("*.py")) if package.is_dir() else []:
        try:
            tree = ast.parse(path.read_text(), str(path))
        except (SyntaxError, ValueError, OSError):
            continue
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            hit = None
            if isinstance(node, ast.Import):
                hit = next((a.name for a in node.names if a.name.split(".")[0] == "solutions"), None)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                hit = node.module if node.module.split(".")[0] == "solutions" else None
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                hit = node.value if re.match(r"\s*solutions([./:]|$)", node.value) else None
            if hit:
                module = ".".join(path.relative_to(package).with_suffix("").parts)
                found[module] = f"{path.relative_to(root).as_posix()} line {node.lineno} uses the reference " \
                                f"answers ({hit})"
                break
    return found


def _modules_loaded(root: pathlib.Path, rel_file: str) -> set[str]:
    """The modules a grader file loads with load_impl("...")."""
    tree = ast.parse((root / rel_file).read_text())
    return {n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call)
            and _dotted(n.func).endswith("load_impl") and n.args and isinstance(n.args[0], ast.Constant)}


def _imports_within(root: pathlib.Path, impl: str, module: str) -> set[str]:
    """Modules of the graded package that `module` imports (one level), e.g. hybrid -> device_grid."""
    path = root.joinpath(*impl.split("."), *module.split(".")).with_suffix(".py")
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError):
        return set()
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                out.update(a.name for a in node.names)
                out.add(base)
            elif base.startswith(impl + "."):
                out.add(base[len(impl) + 1:])
        elif isinstance(node, ast.Call) and _dotted(node.func).endswith("load_impl") and node.args \
                and isinstance(node.args[0], ast.Constant):
            out.add(node.args[0].value)
    return {m for m in out if m}


# ============================================================ the parent: children, and what is left of them

_SUBREAPER = False          # set by the command line only: a library caller (pytest) has children of its own
_OWN_CHILDREN: set[int] = set()


def _set_subreaper():
    """Orphans of the children (a lab that forks and lets its child linger, even under setsid and with its
    environment scrubbed) become this process's children rather than init's, so _kill_leftovers finds them."""
    global _SUBREAPER
    _SUBREAPER = proctree.set_child_subreaper()


def _kill_leftovers(session: int, marker: bytes):
    """SIGKILL every process of the child's session, and every process carrying this grading run's marker
    in its environment or left to us as an orphan, until none is left; reap those that are ours."""
    proctree.kill_group(session)
    me = os.getpid()
    for _ in range(100):
        victims = []
        for proc in proctree.processes():
            if proc.pid == me:
                continue
            ours = proc.session == session or (_SUBREAPER and proc.ppid == me and proc.pid not in _OWN_CHILDREN)
            if not ours:
                try:
                    with open(f"/proc/{proc.pid}/environ", "rb") as f:
                        ours = marker in f.read()
                except OSError:
                    continue
            if ours and proc.state != "Z":
                victims.append(proc.pid)
            if ours and proc.ppid == me:
                proctree.reap(proc.pid)
        if not victims:
            return
        for pid in victims:
            proctree.kill(pid)
        time.sleep(0.05)


_EVENTS_LIMIT = 64 << 20   # bytes of events read from one child: a report larger than this is flooded


class _EventChannel:
    """The parent's end of a child's events socket. The parent drains it while the child runs (a socket buffers
    a few hundred KiB: a child that wrote more would block) and once more after every process of the child is
    gone."""

    def __init__(self, fd: int):
        self.fd, self.data, self.size, self.eof = fd, bytearray(), 0, False
        os.set_blocking(fd, False)

    def pump(self, wait: float) -> None:
        """Read what is there, waiting up to `wait` s for something to arrive."""
        if self.eof:
            return
        import select
        ready, _, _ = select.select([self.fd], [], [], wait)
        while ready and not self.eof:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                self.eof = True
                return
            self.size += len(chunk)
            if len(self.data) <= _EVENTS_LIMIT:
                self.data += chunk

    def close(self) -> list[dict]:
        """The events read, one per line (a line cut short by a dying child is dropped)."""
        self.pump(0)
        os.close(self.fd)
        if self.size > _EVENTS_LIMIT:
            return [{"event": "flooded"}]
        events = []
        for line in bytes(self.data).split(b"\n"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            events.append(event if isinstance(event, dict) else {"event": repr(event)[:40]})
        return events


def _events_channel() -> tuple[int, int]:
    """(read end, write end) of the events channel: a connected pair of Unix sockets, each one-way (the parent
    cannot write, the child cannot read). Not a pipe: a pipe, like a FIFO, can be opened again through
    /proc/PID/fd/N by any process allowed to look there (root always is), a socket cannot (ENXIO)."""
    import socket
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    parent.shutdown(socket.SHUT_WR)
    child.shutdown(socket.SHUT_RD)
    return parent.detach(), child.detach()


def _run_child(root, batch, impl, timeout, quiet, marker):
    """Run the tests of `batch` (exercises of one grader file) in a child pytest; returns (events, how it
    ended: None when pytest finished and exited with the status it reported, else a sentence).

    The events come over a socket that only the child pytest holds (see _guard_report_channel): no path to it
    is in any command line, environment or file, so a rank cannot reach it."""
    nodeids = [test for ex in batch for test in ex.tests]
    read_end, write_end = _events_channel()
    # COURSE_FALLBACK=0: a graded exercise never runs the reference in place of a stub (helpers/impl.py).
    env = dict(os.environ, COURSE_IMPL=impl, COURSE_FALLBACK="0", PYTHONDONTWRITEBYTECODE="1",
               GRADE_RUN=marker.decode().split("=")[1])
    cmd = [sys.executable, "-m", "pytest", *nodeids, "-p", "helpers.grade", "-p", "no:nbval", "-p", "no:cacheprovider",
           f"--grade-report-fd={write_end}", f"--grade-exercises={','.join(ex.id for ex in batch)}",
           f"--timeout={timeout}", "-q", "-rN", "--no-header", "-p", "no:warnings"]
    if not (impl == "solutions" or impl.startswith("solutions.")):
        cmd.append(f"--grade-block-reference={impl}")
    out = subprocess.DEVNULL if quiet else None
    try:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                start_new_session=True, pass_fds=(write_end,))
    finally:
        os.close(write_end)   # the child's copy is the only one: EOF once it (and all it forked) is gone
    channel = _EventChannel(read_end)
    _OWN_CHILDREN.add(proc.pid)
    # pytest-timeout stops a test after `timeout` s; this is the backstop should learner code disarm it.
    running_since, seen = time.monotonic(), 0
    ended = None
    try:
        while True:
            if channel.eof:   # every copy of the child's end is closed: the child is exiting
                try:
                    code = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    pass
            else:
                channel.pump(0.5)
                code = proc.poll()
                if code is not None:
                    break
            if channel.size != seen:  # the report grew: a test started or ended
                seen, running_since = channel.size, time.monotonic()
            limit = timeout + 60 if seen else timeout + 120   # collecting (imports) gets longer
            if time.monotonic() - running_since > limit:
                ended = f"made no progress for {limit:g} s and was stopped"
                proc.kill()
                code = proc.wait()
                break
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _kill_leftovers(proc.pid, marker)
        events = channel.close()
    finished = [e for e in events if e.get("event") == "finished"]
    if ended is None and code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        ended = f"was killed by signal {name}" + (" (out of memory? the OOM killer sends SIGKILL)"
                                                  if -code == signal.SIGKILL else "")
    elif ended is None and not finished:
        ended = f"exited with code {code} before pytest finished (os._exit or sys.exit in the code under test?)"
    elif ended is None and finished[-1].get("exitstatus") != code:
        ended = f"exited with code {code}, not the status {finished[-1].get('exitstatus')!r} that pytest reported"
    return events, ended


def _inconsistent(events, expected) -> str:
    try:
        return _check_session(events, expected)
    except (TypeError, ValueError, AttributeError):   # fields of the wrong type: not what the plugin writes
        return "malformed events"


def _check_session(events, expected) -> str:
    """'' when the events read as one pytest session told them, else what is wrong: one "collected" first,
    holding only tests the parent asked for, each once; each test started once, after it was collected and
    before its results; each (test, phase) reported once, while that test runs, with a known status; at most
    one "finished", last."""
    if not events:
        return ""
    if events[0].get("event") == "flooded":
        return f"it wrote more than {_EVENTS_LIMIT >> 20} MiB of events"
    collected, started, seen, running, done = None, set(), set(), None, False
    for i, e in enumerate(events):
        kind = e.get("event")
        if done:
            return f"an event after the session finished ({kind!r})"
        if kind == "collected":
            tests = e.get("tests")
            if i != 0 or not isinstance(tests, list) or not all(isinstance(t, str) for t in tests) or \
                    len(set(tests)) != len(tests):
                return "the collection was reported twice, late, or with a test twice"
            collected = set(tests)
            stray = sorted(t for t in collected if _function_of(t) not in expected)
            if stray:
                return f"results it was not asked for ({shorten(', '.join(stray), 200)})"
        elif collected is None:
            return f"an event before the collection ({kind!r})"
        elif kind == "start":
            running = e.get("test")
            if not isinstance(running, str) or running not in collected or running in started:
                return f"{shorten(repr(running), 200)} started twice or was never collected"
            started.add(running)
        elif kind == "result":
            test, key = e.get("test"), (e.get("test"), str(e.get("when")))
            if test != running or key in seen or e.get("status") not in (PASSED, FAILED, NOT_STARTED, SKIPPED):
                return f"results it was not asked for ({shorten(str(test), 200)}: reported twice, while " \
                       f"another test ran, or with an unknown status)"
            seen.add(key)
        elif kind == "finished":
            done = True
            failed = any(x.get("status") in (FAILED, NOT_STARTED) for x in events if x.get("event") == "result")
            if e.get("exitstatus") == 0 and failed:
                return "pytest reported success for a session in which a test failed"
        else:
            return f"an unknown event {shorten(str(kind), 40)!r}"
    return ""


def _judge(batch, events, ended):
    """Decide the exercises of one child from its events. Returns ({id: row}, [exercises to run again]).

    A pass is trusted only from a child that finished its session and exited with the status it reported,
    with events consistent with what was asked (_inconsistent). When the child went down (a signal, os._exit,
    no progress), the exercise whose test was running fails; an exercise that already failed keeps its
    failure; every other one, passed or not reached, runs again in a new child."""
    expected = {test: ex for ex in batch for test in ex.tests}
    problem = _inconsistent(events, expected)
    if problem:
        reason = f"the grading process reported {problem}: its report is not trusted"
        return {ex.id: _row(ex, FAILED, reason, []) for ex in batch}, []
    results: dict[str, list[dict]] = {ex.id: [] for ex in batch}
    running = None
    for e in events:
        if e.get("event") == "start":
            running = e.get("test")
        elif e.get("event") == "result":
            test = str(e.get("test"))
            results[expected[_function_of(test)].id].append(
                {"test": test, "status": e["status"], "reason": str(e.get("reason", ""))})
            if e.get("when") == "call" or e["status"] != PASSED:
                running = None  # the test is over (a teardown cannot change its outcome to passed)
    rows, again = {}, []
    culprit = expected.get(_function_of(running)) if running and ended else None
    for ex in batch:
        tests = results[ex.id]
        bad = next((t for t in tests if t["status"] in (NOT_STARTED, FAILED)), None)
        if ex is culprit:
            rows[ex.id] = _row(ex, FAILED, f"{running.split('::')[-1]}: the test process {ended}", tests)
        elif bad is not None:
            name = bad["test"].split("::")[-1]
            reason = bad["reason"] if bad["status"] == NOT_STARTED else f"{name}: {bad['reason']}"
            rows[ex.id] = _row(ex, bad["status"], reason, tests)
        elif ended:
            again.append(ex)  # the process went down: a pass it reported is not trusted; run it again
        else:
            missing = _missing(ex, tests)
            if not missing:
                rows[ex.id] = _row(ex, PASSED, "", tests)
            else:
                rows[ex.id] = _row(ex, FAILED, "not every test of this exercise reported a result (" + missing +
                                   "): the run was cut short or tampered with", tests)
    return rows, again


def _missing(ex, tests) -> str:
    """'' when every test function of the exercise reported the expected number of results."""
    counts = {}
    for t in tests:
        if t["status"] in (PASSED, SKIPPED):
            counts[_function_of(t["test"])] = counts.get(_function_of(t["test"]), 0) + 1
    if not any(t["status"] == PASSED for t in tests):
        return "no test passed"
    for function, expected in ex.tests.items():
        got = counts.get(function, 0)
        if (expected is None and got == 0) or (expected is not None and got != expected):
            return f"{function.split('::')[-1]}: expected {expected or 'some'} results, got {got}"
    return ""


def _row(ex, status, reason, tests):
    counts = list(ex.tests.values())
    total = sum(counts) if None not in counts else len({t["test"] for t in tests})
    return {"exercise": ex.id, "title": ex.title, "optional": ex.optional, "tests": total,
            "passed": sum(t["status"] == PASSED for t in tests), "status": status, "reason": shorten(reason)}


def run(chapter: str | None = None, impl: str = "labs", timeout: int = 180, quiet: bool = True,
        root: pathlib.Path | str = ROOT, child_per_file: bool = True) -> list[dict]:
    """Grade `impl` against the graders under `root`: one row per exercise, in exercise order.

    child_per_file=False runs every grader file in one child (one start-up, one import of torch and
    transformers, instead of one per file): for code that cannot tamper with the run, such as the course's
    own stubs (tests/test_stubs.py). A learner's code is always graded one file per child, so that it can
    misreport at most its own chapter's tests."""
    root = pathlib.Path(root)
    exercises = collect(root, chapter)
    borrowed = borrowed_reference(root, impl)
    marker = f"GRADE_RUN={secrets.token_hex(8)}".encode()
    rows: dict[str, dict] = {}
    files = list(dict.fromkeys(ex.file for ex in exercises))
    groups = [[rel] for rel in files] if child_per_file else [files]
    # No process of this user may take copies of this one's descriptors (pidfd_getfd, ptrace) while it grades.
    dumpable = proctree.set_dumpable(False)
    try:
        for group in groups:
            rel = group[0]
            batch = [ex for ex in exercises if ex.file in group]
            if borrowed:
                if len(group) > 1:
                    raise ValueError("a package that uses the reference answers is graded one file per child")
                uses = _modules_loaded(root, rel)
                uses |= {m for u in list(uses) for m in _imports_within(root, impl, u)}
                why = [borrowed[m] for m in sorted(uses) if m in borrowed]
                if why:
                    for ex in batch:
                        rows[ex.id] = _row(ex, FAILED, why[0] + ": the grade counts only your own code", [])
                    continue
            while batch:
                events, ended = _run_child(root, batch, impl, timeout, quiet, marker)
                decided, again = _judge(batch, events, ended)
                rows.update(decided)
                if len(again) == len(batch):  # nothing decided: it died outside any test; never loop
                    rows.update({ex.id: _row(ex, FAILED, f"the test process {ended} outside any test (while "
                                                         "importing or collecting the graders?)", []) for ex in again})
                    again = []
                batch = again
    finally:
        if dumpable:
            proctree.set_dumpable(True)
    return [rows[ex.id] for ex in exercises]


# ================================================================= instructors: grade a learner's labs/ alone

def checkout_for_submission(submission: str | pathlib.Path, dest: pathlib.Path, ref: str = "HEAD",
                            course: pathlib.Path = ROOT) -> str:
    """Make dest a clean copy of the course at `ref` (git archive: graders, helpers, tests as committed),
    without solutions/, with the learner's labs/ (regular files only) in place of the stubs. Returns the
    commit graded."""
    labs = pathlib.Path(submission) / "labs"
    if not labs.is_dir():
        raise SystemExit(f"--submission {submission}: no labs/ folder there (give the learner's checkout)")
    commit = subprocess.run(["git", "-C", str(course), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                            capture_output=True, text=True)
    if commit.returncode != 0:
        raise SystemExit(f"--ref {ref}: not a commit of the course repository at {course} "
                         f"({commit.stderr.strip() or 'is it a git checkout?'})")
    archive = subprocess.run(["git", "-C", str(course), "archive", "--format=tar", commit.stdout.strip()],
                             capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    for name in ("solutions", "labs"):
        shutil.rmtree(dest / name, ignore_errors=True)
    for path in sorted(labs.rglob("*")):
        rel = path.relative_to(labs)
        if "__pycache__" in rel.parts:
            continue
        if path.is_symlink():
            raise SystemExit(f"--submission: labs/{rel} is a symbolic link; submit the file itself")
        target = dest / "labs" / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return commit.stdout.strip()


# ============================================================================================ command line

TABLE_WIDTH = 100    # columns: the table fits a terminal and a CI log without wrapping


def render(exercises: list[dict], width: int = TABLE_WIDTH) -> str:
    """The table a learner reads: one line per exercise (longer titles and the reasons wrap), at most `width`
    columns, then the score line."""
    import textwrap
    mark = {PASSED: "PASS", FAILED: "FAIL", NOT_STARTED: "TODO"}
    head = f"{'':4}  {'exercise':<8} {'tests':>7}  {'status':<11}  "
    lines = [head + "title"]
    for e in exercises:
        title = e["title"] + (" (optional)" if e.get("optional") and "optional" not in e["title"] else "")
        first = f"{mark.get(e['status'], e['status'][:4].upper()):4}  {e['exercise']:<8} " \
                f"{e['passed']:>3}/{e['tests']:<3}  {e['status']:<11}  "
        wrapped = textwrap.wrap(title, width - len(first)) or [""]
        lines.append(first + wrapped[0])
        lines += [" " * len(first) + more for more in wrapped[1:]]
        if e["reason"]:
            lines += textwrap.wrap(e["reason"], width, initial_indent=" " * 6 + "↳ ", subsequent_indent=" " * 8,
                                   break_long_words=True, break_on_hyphens=False)
    lines.append("\n" + summary_line(exercises))
    return "\n".join(lines)


def score(exercises: list[dict]) -> dict:
    """Required exercises decide the score (and the exit status); optional ones are counted apart."""
    required = [e for e in exercises if not e.get("optional")]
    optional = [e for e in exercises if e.get("optional")]
    return {"score": sum(e["status"] == PASSED for e in required), "total": len(required),
            "optional_passed": sum(e["status"] == PASSED for e in optional), "optional_total": len(optional)}


def summary_line(exercises: list[dict]) -> str:
    s = score(exercises)
    left = s["total"] - s["score"]
    line = f"score: {s['score']}/{s['total']} exercises passed" + \
        (f"; {left} exercise{'s' if left != 1 else ''} left" if left else "; all done")
    if s["optional_total"]:
        line += f" (optional: {s['optional_passed']}/{s['optional_total']} passed, not counted)"
    return line


def fork_commit(fork: str | pathlib.Path) -> str | None:
    """The commit the learner's checkout is at (None when it is not a git checkout)."""
    out = subprocess.run(["git", "-C", str(fork), "rev-parse", "--verify", "HEAD^{commit}"], capture_output=True,
                         text=True)
    return out.stdout.strip() if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", out.stdout.strip()) else None


def grade_submission(fork, chapter=None, ref="HEAD", timeout=180, quiet=True) -> dict:
    """Grade one learner's labs/ alone, in a clean checkout of the course at `ref` (see
    checkout_for_submission). Returns its report: the fork, its commit, the course commit, when the grading
    started (UTC), how long it took, the score and one row per exercise."""
    started, clock = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.monotonic()
    info = {"submission": str(fork), "fork_commit": fork_commit(fork), "started": started}
    with tempfile.TemporaryDirectory(prefix="dil-submission-") as tmp:
        root = pathlib.Path(tmp) / "course"
        info["commit"] = checkout_for_submission(fork, root, ref)
        exercises = run(chapter, "labs", timeout, quiet=quiet, root=root)
    return {**info, "seconds": round(time.monotonic() - clock, 1), **score(exercises), "exercises": exercises}


def class_forks(paths: list[str]) -> dict[str, pathlib.Path]:
    """{learner: fork} from `--class` arguments: a learner's checkout (it has labs/), a folder of such
    checkouts (one per learner, named after them), or a text file listing checkouts, one per line."""
    forks: dict[str, pathlib.Path] = {}
    for arg in paths:
        path = pathlib.Path(arg)
        if path.is_file():
            listed = [pathlib.Path(line.strip()) for line in path.read_text().splitlines()
                      if line.strip() and not line.lstrip().startswith("#")]
        elif (path / "labs").is_dir():
            listed = [path]
        elif path.is_dir():
            listed = sorted(p for p in path.iterdir() if (p / "labs").is_dir())
            if not listed:
                raise SystemExit(f"--class {arg}: no learner's checkout (a folder with labs/) in it")
        else:
            raise SystemExit(f"--class {arg}: no such folder or list file")
        for fork in listed:
            name = fork.resolve().name
            if name in forks and forks[name].resolve() != fork.resolve():
                name = f"{name}-{len(forks)}"
            forks[name] = fork
    return forks


CLASS_COLUMNS = ["learner", "submission", "fork_commit", "commit", "started", "seconds", "exercise", "title",
                 "optional", "status", "passed", "tests", "reason"]


def grade_class(paths: list[str], out: str | None = None, chapter=None, ref="HEAD", timeout=180,
                quiet=True) -> list[dict]:
    """Grade every learner's fork, one after the other, each alone (grade_submission). Writes `out` (.csv: one
    row per learner per exercise, CLASS_COLUMNS; .json: the same rows and each learner's report) after
    every learner, so an interrupted run keeps what it graded. Returns the learners' reports."""
    reports = []
    forks = class_forks(paths)
    for i, (learner, fork) in enumerate(forks.items(), 1):
        print(f"[{i}/{len(forks)}] {learner} ({fork}) ...", flush=True)
        report = {"learner": learner, **grade_submission(fork, chapter, ref, timeout, quiet)}
        reports.append(report)
        print(f"      {summary_line(report['exercises'])}  ({report['seconds']:.0f} s, fork at "
              f"{(report['fork_commit'] or 'no git commit')[:12]})", flush=True)
        if out:
            write_class_report(reports, out)
    return reports


def write_class_report(reports: list[dict], out: str) -> None:
    """FILE.csv: one row per learner per exercise (CLASS_COLUMNS); FILE.json: those rows and every report."""
    import csv
    rows = [{**{k: r[k] for k in CLASS_COLUMNS[:6]}, **{k: e[k] for k in CLASS_COLUMNS[6:]}}
            for r in reports for e in r["exercises"]]
    if str(out).endswith(".csv"):
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CLASS_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    else:
        with open(out, "w") as f:
            json.dump({"rows": rows, "learners": reports}, f, indent=2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.grade", description=__doc__.split("\n\n")[0])
    parser.add_argument("chapter", nargs="?", help="grade only this chapter, e.g. 1")
    parser.add_argument("--impl", default=os.environ.get("GRADE_IMPL", "labs"),
                        help="package to grade: labs (yours, default) or solutions (the reference)")
    parser.add_argument("--submission", metavar="DIR",
                        help="instructors: grade DIR/labs alone in a clean checkout of this course (git archive "
                             "of --ref), without solutions/")
    parser.add_argument("--class", dest="klass", metavar="PATH", nargs="+",
                        help="instructors: grade a class, each learner as --submission does; PATH is a folder of "
                             "learners' checkouts, a checkout, or a file listing checkouts (one per line)")
    parser.add_argument("--out", metavar="FILE.csv|FILE.json",
                        help="with --class: one row per learner per exercise (CSV), or the rows and each "
                             "learner's report (JSON)")
    parser.add_argument("--ref", default="HEAD", help="with --submission/--class: the course commit to grade against")
    parser.add_argument("--json", metavar="FILE", help="also write a machine-readable report here")
    parser.add_argument("--markdown", metavar="FILE", help="append a Markdown summary here (e.g. $GITHUB_STEP_SUMMARY)")
    parser.add_argument("--timeout", type=int, default=180, help="seconds before one grader test is failed")
    parser.add_argument("--exit-zero", action="store_true",
                        help="exit 0 even when exercises are left (make grade GRADE_ARGS=--exit-zero)")
    parser.add_argument("--verbose", action="store_true", help="show pytest's own output")
    args = parser.parse_args(argv)
    if args.chapter is not None and not args.chapter.isdigit():
        parser.error(f"CHAPTER must be a chapter number such as 1, got {args.chapter!r}")
    if (args.submission or args.klass) and args.impl != "labs":
        parser.error("--submission and --class grade the learners' labs/; leave --impl out")
    if args.klass:
        if args.submission or args.json:
            parser.error("--class writes its report with --out; leave --submission and --json out")
        reports = grade_class(args.klass, args.out, args.chapter, args.ref, args.timeout, quiet=not args.verbose)
        if args.markdown:
            with open(args.markdown, "a") as f:
                f.write(class_markdown(reports))
        return 0
    if args.submission:
        report = grade_submission(args.submission, args.chapter, args.ref, args.timeout, quiet=not args.verbose)
        exercises = report.pop("exercises")
        info = {"impl": "labs", **report}
    else:
        started, clock = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.monotonic()
        exercises = run(args.chapter, args.impl, args.timeout, quiet=not args.verbose, root=ROOT)
        info = {"impl": args.impl, "started": started, "seconds": round(time.monotonic() - clock, 1)}
    if not exercises:
        print(f"no exercises found{' in chapter ' + args.chapter if args.chapter else ''}")
        return 2
    print(render(exercises), flush=True)
    totals = score(exercises)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**info, **totals, "exercises": exercises}, f, indent=2)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(markdown(exercises))
    return 0 if totals["score"] == totals["total"] or args.exit_zero else 1


def class_markdown(reports: list[dict]) -> str:
    rows = ["## Class grade\n", "| learner | score | optional | fork commit | graded (UTC) | seconds |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in reports:
        rows.append(f"| {r['learner']} | {r['score']}/{r['total']} | {r['optional_passed']}/{r['optional_total']} "
                    f"| {(r['fork_commit'] or '')[:12]} | {r['started']} | {r['seconds']:.0f} |")
    return "\n".join(rows) + "\n"


def markdown(exercises: list[dict]) -> str:
    icon = {PASSED: "✅", FAILED: "❌", NOT_STARTED: "⬜"}
    rows = [f"## {summary_line(exercises)[0].upper()}{summary_line(exercises)[1:]}\n",
            "| | exercise | title | status | reason |",
            "| --- | --- | --- | --- | --- |"]
    for e in exercises:
        reason = e["reason"].replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {icon[e['status']]} | {e['exercise']} | {e['title']} | {e['status']} | {reason} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    _set_subreaper()  # only as a command: a library caller (pytest) has children of its own
    sys.exit(main())
