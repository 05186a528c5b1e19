"""A server launcher that imports torch, transformers and the server once, then forks a fresh server per request.

Starting `python -m helpers.course.serving` costs a few CPU seconds before it serves anything, nearly all of
it importing torch and transformers (about 6 s of CPU on the course's 2-core machine; the server's own start
is under half a second). A chapter that starts four servers would spend most of its run importing. So
`start_server` (background.py) keeps one launcher process: it imports what every server imports, then waits
for commands on stdin and answers each by forking a child that runs the very same `main(argv)` as
`python -m helpers.course.serving ARGS` — with the command line, the environment and the working directory
it was given, in its own session (so `stop()` signals it and its replicas as a process group), its output in
its own log file. This is what gunicorn's `--preload` and multiprocessing's forkserver do. The environment
carries SERVING_PORT_PIPE, the named pipe on which the server reports its port to start_server (background.py
report_port): nothing here reads it.

Nothing the learner writes is imported here: the policy (exercise 6.2) and the tensor-parallel code are
imported by each server as it starts, so a new server always runs the current `labs/` code.

Protocol, one JSON object per line:
    stdin   {"id": n, "argv": [...], "env": {...}, "cwd": "...", "log": "/tmp/..."}   start a server
    stdout  {"id": n, "started": pid}            the server's pid
            {"exited": pid, "code": c}           a server ended (c < 0: killed by signal -c)
The launcher exits when stdin closes.
"""
from __future__ import annotations

import json
import os
import select
import signal
import sys
import traceback

from helpers import proctree

PRELOAD = ("helpers.course.serving.__main__", "helpers.course.tiny_llama", "helpers.course.serving.device_time")


def _send(message: dict) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())   # one write per line: lines never interleave


def _child(command: dict) -> int:
    """In the forked child: become the server described by `command`; returns its exit code."""
    os.setsid()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    log = os.open(command["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(devnull)
    os.chdir(command["cwd"])
    os.environ.clear()
    os.environ.update(command["env"])
    sys.argv = [sys.executable, "-m", "helpers.course.serving", *command["argv"]]
    from helpers.course.serving.__main__ import main
    try:
        main(command["argv"])
        return 0
    except SystemExit as e:
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr, flush=True)   # what the interpreter prints for SystemExit("...")
            return 1
        return e.code or 0
    except BaseException:
        traceback.print_exc()
        return 1


def _reap() -> None:
    for pid, code in proctree.reap():
        _send({"exited": pid, "code": code})


def main() -> None:
    import importlib
    for name in PRELOAD:
        importlib.import_module(name)
    _send({"ready": os.getpid()})
    buffer = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.05)
        _reap()
        if not readable:
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            return   # the parent closed stdin (or died): servers already started live on
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            command = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = _child(command)
                finally:
                    try:
                        sys.stdout.flush()
                        sys.stderr.flush()
                    finally:
                        os._exit(code)
            _send({"id": command["id"], "started": pid})


if __name__ == "__main__":
    main()
