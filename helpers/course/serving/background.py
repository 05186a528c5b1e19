"""Start the server from Python (a notebook cell, a test) as a background process, and stop it cleanly.

    from helpers.course.serving import start_server
    with start_server(replicas=2, batching="continuous") as server:    # waits until every replica is up
        print(server.url)                                               # http://127.0.0.1:<port>
        server.replicas()                                               # pid, state, load of each replica
    # leaving the block stops the front end and every replica: nothing is left running

The server runs in its own process group (`python -m helpers.course.serving ...`, the same command a learner
types), so stop() can signal the front end and all its replicas at once; each replica also dies with its
parent. An atexit hook stops servers a notebook forgot to stop when the kernel exits.

`api_key="..."` starts the server with a key (passed in its environment, not on its command line, where
`ps` would show it to everyone) and makes get() and complete() send it.
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
import time
import urllib.error
import urllib.request
import weakref

ROOT = pathlib.Path(__file__).resolve().parents[2]
_live: "weakref.WeakSet[ServerProcess]" = weakref.WeakSet()


class ServerProcess:
    def __init__(self, replicas=2, batching="continuous", max_batch=8, policy="least_outstanding",
                 max_retries=3, restart=True, model="helpers.course.tiny_llama", tp=1, pp=1, choose=None,
                 startup_timeout=120.0, env=None, stuck_after=None, api_key=None):
        self.log_path = tempfile.mktemp(prefix="dil-server-", suffix=".log")
        argv = [sys.executable, "-m", "helpers.course.serving", "--port", "0", "--replicas", str(replicas),
                "--batching", batching, "--max-batch", str(max_batch), "--policy", policy,
                "--max-retries", str(max_retries), "--model", model, "--tp", str(tp), "--pp", str(pp)]
        argv += ([] if restart else ["--no-restart"]) + (["--choose", choose] if choose else [])
        argv += [] if stuck_after is None else ["--stuck-after", str(stuck_after)]
        self.api_key = api_key
        environment = dict(os.environ, **(env or {}))
        environment.pop("SERVING_API_KEY", None)
        if api_key is not None:
            environment["SERVING_API_KEY"] = api_key
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
        environment.setdefault("OMP_NUM_THREADS", "1")
        self._log = open(self.log_path, "wb")
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


def start_server(**options) -> ServerProcess:
    """Start `python -m helpers.course.serving` with these options in the background; returns when it serves."""
    return ServerProcess(**options)


@atexit.register
def _stop_all():
    for server in list(_live):
        server.stop(timeout=2.0)
