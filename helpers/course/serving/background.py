"""Start the server from Python (a notebook cell, a test) as a background process, and stop it cleanly.

    from helpers.course.serving import start_server
    with start_server(replicas=2, batching="continuous") as server:    # waits until every replica is up
        print(server.url)                                               # http://127.0.0.1:<port>
        server.replicas()                                               # pid, state, load of each replica
    # leaving the block stops the front end and every replica: nothing is left running

The server runs in its own session and process group (the `main()` of `python -m helpers.course.serving
...`, the command a learner types), so stop() can signal the front end and all its replicas at once; each
replica also dies with its parent. An atexit hook stops servers a notebook forgot to stop when the kernel exits.

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
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref

ROOT = pathlib.Path(__file__).resolve().parents[3]   # the repository
_live: "weakref.WeakSet[ServerProcess]" = weakref.WeakSet()


class ServerProcess:
    def __init__(self, replicas=2, batching="continuous", max_batch=8, policy="least_outstanding",
                 max_retries=3, restart=True, model="helpers.course.tiny_llama", tp=1, pp=1, choose=None,
                 startup_timeout=120.0, env=None, stuck_after=None, api_key=None, kv_cache="contiguous",
                 num_blocks=None, block_size=None, enable_prefix_caching=False, max_num_batched_tokens=None):
        self.log_path = tempfile.mktemp(prefix="dil-server-", suffix=".log")
        argv = [sys.executable, "-m", "helpers.course.serving", "--port", "0", "--replicas", str(replicas),
                "--batching", batching, "--max-batch", str(max_batch), "--policy", policy,
                "--max-retries", str(max_retries), "--model", model, "--tp", str(tp), "--pp", str(pp)]
        argv += ([] if restart else ["--no-restart"]) + (["--choose", choose] if choose else [])
        argv += [] if stuck_after is None else ["--stuck-after", str(stuck_after)]
        argv += ["--kv-cache", kv_cache] + (["--enable-prefix-caching"] if enable_prefix_caching else [])
        for flag, option in (("--num-blocks", num_blocks), ("--block-size", block_size),
                             ("--max-num-batched-tokens", max_num_batched_tokens)):
            argv += [] if option is None else [flag, str(option)]
        self.api_key = api_key
        environment = dict(os.environ, **(env or {}))
        environment.pop("SERVING_API_KEY", None)
        if api_key is not None:
            environment["SERVING_API_KEY"] = api_key
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
        self.url = None
        try:
            self._wait_started(startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_started(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = pathlib.Path(self.log_path).read_text(errors="replace")
            for line in text.splitlines():
                if line.startswith("serving ") and " on http://" in line:
                    self.url = line.split(" on ")[1].split()[0]
                    return
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode}:\n{text[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"the server did not start within {timeout:g} s; its log:\n"
                           f"{pathlib.Path(self.log_path).read_text(errors='replace')[-3000:]}")

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
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever is left in the group (normally nothing)
        except (ProcessLookupError, PermissionError):
            pass
        if self.process.poll() is None:
            self.process.wait()
        self._log.close()
        try:
            os.unlink(self.log_path)
        except OSError:
            pass
        _live.discard(self)
        return self.process.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return f"ServerProcess({self.url}, running={self.process.poll() is None})"


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
                    _kill(message["started"])
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
        return None if _alive(pid) else -1   # the launcher is gone and cannot tell: only whether it lives

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
    files = [*(ROOT / "helpers" / "course" / "serving").glob("*.py"), ROOT / "helpers" / "course" / "tiny_llama.py"]
    return max(f.stat().st_mtime for f in files if f.exists())


def _kill(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
    except OSError:
        return True


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


def start_server(**options) -> ServerProcess:
    """Start `python -m helpers.course.serving` with these options in the background; returns when it serves."""
    return ServerProcess(**options)


@atexit.register
def _stop_all():
    for server in list(_live):
        server.stop(timeout=2.0)
    for launcher in _launchers:
        launcher.stop()
