"""Start the server from Python (a notebook cell, a test) as a background process, and stop it cleanly.

    from helpers.course.serving import start_server
    with start_server(replicas=2, batching="continuous") as server:    # waits until every replica is up
        print(server.url)                                               # http://127.0.0.1:<port>
        server.replicas()                                               # pid, state, load of each replica
    # leaving the block stops the front end and every replica: nothing is left running

The server runs in its own session and process group (the `main()` of `python -m helpers.course.serving
...`, the command a learner types), so stop() can signal the front end and all its replicas at once; each
replica also dies with its parent. An atexit hook stops servers a notebook forgot to stop when the kernel exits.

The options are a ServeConfig's (config.py: vLLM's names, or the course's older ones such as replicas=, tp=,
max_batch=), checked before any process starts. The server writes its port, once every replica is up, to a
named pipe this process reads (report_port; the log keeps its human-readable "serving ... on http://..." line).

`api_key="..."` starts the server with a key (passed in its environment, not on its command line, where
`ps` would show it to everyone) and makes get() and complete() send it.

Starting fast. `python -m helpers.course.serving` spends about 6 CPU seconds importing torch and transformers
before it serves. So the first start_server() starts a launcher (launcher.py) that imports them once, and
every server is then forked from it: the same `main(argv)`, command line, environment and working directory,
its own session and log, in under a second. SERVING_LAUNCHER=0 in the environment starts each server as a
plain `python -m helpers.course.serving` process instead. The launcher is replaced when the server's code
changes on disk, and it exits with the process that started it.
"""
from __future__ import annotations

import atexit
import json
import os
import pathlib
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref

from helpers import proctree
from helpers.course.serving.config import API_KEY_ENV, ServeConfig

ROOT = pathlib.Path(__file__).resolve().parents[3]   # the repository
_live: "weakref.WeakSet[ServerProcess]" = weakref.WeakSet()


PORT_PIPE_ENV = "SERVING_PORT_PIPE"   # where a server started here writes its port once it serves


class ServerProcess:
    """A running server: `python -m helpers.course.serving` with `config` (a ServeConfig) in its own session.
    Returns once every replica is up, with the port the server bound (config.port 0: any free port)."""

    def __init__(self, config: ServeConfig, startup_timeout: float = 120.0, env: dict | None = None):
        self.config = config
        self.api_key = config.api_key
        self.process = self.url = self._log = self._port_fd = None
        # The server's log, and a named pipe on which it writes "PORT\n" once it serves (report_port): the
        # port comes from the server itself, not from reading its log.
        self._dir = tempfile.mkdtemp(prefix="dil-server-")
        self.log_path = os.path.join(self._dir, "server.log")
        try:
            self._start(startup_timeout, env)
            self._wait_started(startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, startup_timeout: float, env: dict | None) -> None:
        port_pipe = os.path.join(self._dir, "port")
        os.mkfifo(port_pipe, 0o600)
        self._port_fd = os.open(port_pipe, os.O_RDONLY | os.O_NONBLOCK)   # open before the server writes
        argv = [sys.executable, "-m", "helpers.course.serving", *self.config.to_argv()]
        environment = dict(os.environ, **(env or {}))
        environment.pop(API_KEY_ENV, None)
        if self.config.api_key is not None:
            environment[API_KEY_ENV] = self.config.api_key   # not on the command line, where `ps` shows it to all
        environment[PORT_PIPE_ENV] = port_pipe
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
        environment.setdefault("OMP_NUM_THREADS", "1")
        self._log = open(self.log_path, "wb")
        launcher = _launcher() if environment.get("SERVING_LAUNCHER", "1") != "0" else None
        self.process = None if launcher is None else launcher.start(argv[3:], environment, self.log_path,
                                                                   timeout=startup_timeout)
        if self.process is None:   # no launcher: a process of its own, which imports everything itself
            self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                            env=environment, start_new_session=True)
        _live.add(self)

    def _log_text(self) -> str:
        try:
            return pathlib.Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def _wait_started(self, timeout):
        """Wait for the port on the pipe; the server's exit (or the timeout) raises with the end of its log."""
        deadline, received = time.monotonic() + timeout, b""
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self._port_fd], [], [], 0.05)
            if readable:
                try:
                    received += os.read(self._port_fd, 64)
                except BlockingIOError:
                    pass
                if received.endswith(b"\n"):
                    host = self.config.host if self.config.host != "::1" else "[::1]"
                    self.url = f"http://{host}:{int(received)}"
                    return
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode}:\n"
                                   f"{self._log_text()[-3000:]}")
            if readable and not received:
                time.sleep(0.05)   # a writer came and went without a word: only the exit above can end this
        raise TimeoutError(f"the server did not start within {timeout:g} s; its log:\n{self._log_text()[-3000:]}")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def _headers(self) -> dict:
        return {} if self.api_key is None else {"Authorization": f"Bearer {self.api_key}"}

    def get(self, path: str, timeout: float = 10.0):
        """GET a path; returns the decoded JSON, or the text for /metrics."""
        request = urllib.request.Request(self.url + path, headers=self._headers())
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read().decode()
        return body if path == "/metrics" else json.loads(body)

    def complete(self, timeout: float = 60.0, **body) -> dict:
        """POST /v1/completions with `body` as JSON; returns the response JSON (raises HTTPError on 4xx/5xx)."""
        request = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json", **self._headers()})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def replicas(self) -> list[dict]:
        return self.get("/replicas")["replicas"]

    def kill_replica(self, index: int, sig=signal.SIGKILL) -> int:
        """Kill replica `index`'s process, as a crash would; returns the pid killed."""
        pid = self.replicas()[index]["pid"]
        os.kill(pid, sig)
        return pid

    def wait_ready(self, n: int | None = None, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = [r["state"] for r in self.replicas()]
            if states.count("ready") >= (n if n is not None else len(states)):
                return
            time.sleep(0.05)
        raise TimeoutError(f"replicas not ready within {timeout:g} s: {self.replicas()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the front end and every replica (SIGTERM to the process group, SIGKILL after `timeout`)."""
        if self.process is not None:
            if self.process.poll() is None:
                proctree.kill_group(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            proctree.kill_group(self.process.pid, signal.SIGKILL)  # what is left in the group (normally nothing)
            if self.process.poll() is None:
                self.process.wait()
        if self._log is not None:
            self._log.close()
        if self._port_fd is not None:
            os.close(self._port_fd)
            self._port_fd = None
        shutil.rmtree(self._dir, ignore_errors=True)
        _live.discard(self)
        return None if self.process is None else self.process.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return f"ServerProcess({self.url}, running={self.process is not None and self.process.poll() is None})"


class LaunchedProcess:
    """A server forked by the launcher, with the part of subprocess.Popen's interface that ServerProcess uses.
    It is the launcher's child, not ours: the launcher reports its exit status."""

    def __init__(self, pid: int, launcher: "Launcher"):
        self.pid, self._launcher, self.returncode = pid, launcher, None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._launcher.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"server pid {self.pid}", timeout)
            time.sleep(0.02)
        return self.returncode


class Launcher:
    """The launcher process (launcher.py) and a thread that reads its answers."""

    def __init__(self, environment: dict):
        self.stamp = _source_stamp()
        self.process = subprocess.Popen([sys.executable, "-m", "helpers.course.serving.launcher"], cwd=ROOT,
                                        env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        start_new_session=True)
        self._lock, self._answer = threading.Lock(), threading.Condition()
        self._ids = iter(range(1, 1 << 62))
        self._started: dict[int, int] = {}   # command id -> pid
        self._abandoned: set[int] = set()    # commands whose caller stopped waiting (Ctrl-C): kill what they start
        self._exits: dict[int, int] = {}
        self.alive = True
        threading.Thread(target=self._read, name="server-launcher", daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            message = json.loads(line)
            with self._answer:
                if "started" in message and message["id"] in self._abandoned:
                    self._abandoned.discard(message["id"])
                    proctree.kill_group(message["started"])   # its own session: it and its replicas
                    proctree.kill(message["started"])
                elif "started" in message:
                    self._started[message["id"]] = message["started"]
                elif "exited" in message:
                    self._exits[message["exited"]] = message["code"]
                self._answer.notify_all()
        with self._answer:
            self.alive = False
            self._answer.notify_all()

    def start(self, argv: list[str], environment: dict, log_path: str, timeout: float = 120.0):
        """Fork a server running `python -m helpers.course.serving argv`: a LaunchedProcess, or None if the
        launcher is gone or has not answered within `timeout` seconds (still importing on a starved machine)."""
        with self._lock:
            command = {"id": next(self._ids), "argv": argv, "env": environment, "cwd": str(ROOT), "log": log_path}
            try:
                self.process.stdin.write((json.dumps(command) + "\n").encode())
                self.process.stdin.flush()
            except (OSError, ValueError):
                return None
        deadline = time.monotonic() + timeout
        with self._answer:
            try:
                while command["id"] not in self._started and self.alive and time.monotonic() < deadline:
                    self._answer.wait(max(0.0, deadline - time.monotonic()))
            except BaseException:   # interrupted while the launcher forks: the server it starts has no owner
                self._abandoned.add(command["id"])
                raise
            pid = self._started.pop(command["id"], None)
            if pid is None:
                self._abandoned.add(command["id"])   # if it answers after all, that server is killed
        return None if pid is None else LaunchedProcess(pid, self)

    def exit_code(self, pid: int) -> int | None:
        with self._answer:
            if pid in self._exits:
                return self._exits[pid]
            if self.alive:
                return None
        return None if proctree.alive(pid) else -1   # the launcher is gone and cannot tell: only whether it lives

    def stop(self) -> None:
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_launchers: list[Launcher] = []
_launcher_lock = threading.Lock()


def _source_stamp() -> float:
    """Newest modification time of the code the launcher preloads: a newer one means start a new launcher."""
    course = ROOT / "helpers" / "course"
    files = [*(course / "serving").glob("*.py"), *(course / "engine").glob("*.py"), course / "tiny_llama.py",
             ROOT / "helpers" / "proctree.py"]
    return max(f.stat().st_mtime for f in files if f.exists())


def _launcher() -> Launcher | None:
    """The launcher, started on first use (or again after the server's code changed); None where there is none."""
    if not os.path.isdir("/proc") or not hasattr(os, "fork"):
        return None
    with _launcher_lock:
        current = _launchers[-1] if _launchers else None
        if current is not None and current.alive and current.stamp == _source_stamp():
            return current
        if current is not None:
            current.stop()   # servers it started live on: they are in their own sessions
        environment = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        environment.pop("SERVING_API_KEY", None)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
        try:
            _launchers[:] = [Launcher(environment)]
        except OSError:
            return None
        return _launchers[0]


def start_launcher() -> None:
    """Start the launcher now, without waiting for it: it imports torch and transformers while the caller
    does other work, so the first start_server() need not wait for that. (start_server starts it anyway.)"""
    if os.environ.get("SERVING_LAUNCHER", "1") != "0":
        _launcher()


def start_server(config: ServeConfig | None = None, *, startup_timeout: float = 120.0, env: dict | None = None,
                 **options) -> ServerProcess:
    """Start `python -m helpers.course.serving` in the background; returns when every replica serves.

    The options are ServeConfig's fields (vLLM's names: tensor_parallel_size, max_num_seqs, ...) or the course's
    older names (replicas, tp, pp, max_batch, num_blocks, model_name); they are checked here, before any process
    starts (ValueError, TypeError). Or pass a ServeConfig. The port is any free one unless `port=` says which.
    startup_timeout: seconds to wait for the server; env: variables added to its environment."""
    if config is None:
        config = ServeConfig.from_options(**{"port": 0, **options})
    elif options:
        raise TypeError("start_server(config, ...): give the options in the config (config.replace(...))")
    return ServerProcess(config, startup_timeout=startup_timeout, env=env)


def report_port(port: int) -> None:
    """The server's half of the handshake (__main__.serve calls it once it serves): write the port to the pipe
    that start_server named in $SERVING_PORT_PIPE. Nothing if there is none (a server started by hand), or if
    nobody reads it any more (start_server gave up waiting)."""
    path = os.environ.pop(PORT_PIPE_ENV, None)
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:   # ENXIO: no reader left; ENOENT: removed
        return
    try:
        os.write(fd, f"{port}\n".encode())   # one write of a few bytes: atomic on a pipe
    except OSError:
        pass
    finally:
        os.close(fd)


@atexit.register
def _stop_all():
    for server in list(_live):
        server.stop(timeout=2.0)
    for launcher in _launchers:
        launcher.stop()
