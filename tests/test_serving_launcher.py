"""start_server's launcher (helpers/course/serving/launcher.py): servers forked from one process that imported
torch once behave like `python -m helpers.course.serving` processes of their own."""
import os
import pathlib
import subprocess

import pytest

from helpers import proctree
from helpers.course import tiny_llama
from helpers.course.serving import background, start_server

MODEL = "helpers.course.serving.device_time"


def test_servers_are_forked_from_one_launcher_and_stop_cleanly():
    reference = tiny_llama.generate(tiny_llama.load_model(), tiny_llama.encode(tiny_llama.PROMPT), 4)
    servers = [start_server(replicas=1, model=MODEL) for _ in range(2)]
    try:
        launcher = background._launchers[-1]
        assert all(isinstance(s.process, background.LaunchedProcess) for s in servers)
        assert {proctree.parent(s.process.pid) for s in servers} == {launcher.process.pid}
        for s in servers:
            assert f" on {s.url} with " in pathlib.Path(s.log_path).read_text()   # the pipe's port, the log's line
            reply = s.complete(prompt=tiny_llama.PROMPT, max_tokens=4, temperature=0, return_token_ids=True)
            assert reply["choices"][0]["token_ids"] == reference
        pids = [p for s in servers for p in [s.process.pid] + [r["pid"] for r in s.replicas()]]
    finally:
        codes = [s.stop() for s in servers]
    assert codes == [0, 0], f"a server stopped by SIGTERM exits 0, got {codes}"
    assert not [p for p in pids if proctree.alive(p)], "stop() left a front end or a replica running"


def test_a_server_that_cannot_start_reports_its_exit_code_and_log():
    with pytest.raises(RuntimeError, match=r"exited with code 1(.|\n)*no_such_model"):
        start_server(replicas=1, model="no_such_model")


def test_a_server_refusing_its_options_says_why_in_its_log():
    """SystemExit("why") in a forked server is printed, as the interpreter prints it for a process of its own."""
    with pytest.raises(RuntimeError, match=r"exited with code 1(.|\n)*--pp 3 does not divide the model's 4 layers"):
        start_server(replicas=1, pp=3)


def test_without_the_launcher_a_server_is_a_process_of_its_own():
    with start_server(replicas=1, model=MODEL, env={"SERVING_LAUNCHER": "0"}) as s:
        assert isinstance(s.process, subprocess.Popen)
        assert s.complete(prompt="Four", max_tokens=2)["usage"]["completion_tokens"] == 2


def test_the_launcher_is_replaced_when_the_server_code_changes(monkeypatch):
    first = background._launcher()
    monkeypatch.setattr(background, "_source_stamp", lambda: first.stamp + 1.0)
    second = background._launcher()
    assert second is not first and second.alive
    assert first.process.wait(10) == 0, "the old launcher exits once its stdin is closed"


def test_the_server_reports_its_port_through_a_pipe(tmp_path, monkeypatch):
    """report_port, the server's half: one line on the named pipe start_server gave it; nothing, without
    blocking, when no one reads it any more (start_server gave up) or no pipe was given (a server started by hand)."""
    pipe = tmp_path / "port"
    os.mkfifo(pipe)
    monkeypatch.setenv(background.PORT_PIPE_ENV, str(pipe))
    background.report_port(1234)                          # no reader: returns at once
    reader = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK)
    try:
        monkeypatch.setenv(background.PORT_PIPE_ENV, str(pipe))
        background.report_port(4321)
        assert os.read(reader, 64) == b"4321\n" and background.PORT_PIPE_ENV not in os.environ
        background.report_port(5555)                      # no pipe named: nothing
        assert os.read(reader, 64) == b""
    finally:
        os.close(reader)
