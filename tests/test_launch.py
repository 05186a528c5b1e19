"""The launcher's contract: results and output in rank order, clear errors, no process left behind."""
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from helpers import JobTimeout, RankFailed, launch, proctree


def _alive(pid):
    return proctree.alive(pid)   # a zombie does not count: it is gone once reaped, what "left behind" means here


def _record_pid(tmp_path, rank):
    (tmp_path / f"pid{rank}").write_text(str(os.getpid()))


def _pids(tmp_path):
    return [int(p.read_text()) for p in tmp_path.glob("pid*")]


def _all_reduce_job(rank, world_size, scale, offset=0.0):
    t = torch.tensor([rank + 1.0] * 2) * scale + offset
    dist.all_reduce(t)
    print(f"sum is {t.tolist()}")
    return t


def test_results_and_output_in_rank_order(capsys):
    results = launch(_all_reduce_job, 4, 2.0, offset=1.0)
    expected = torch.tensor([2.0 * 10 + 4] * 2)
    assert len(results) == 4 and all(torch.equal(r, expected) for r in results)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"[rank {r}] sum is [24.0, 24.0]" for r in range(4)]
    assert results.outputs[2] == "sum is [24.0, 24.0]\n" and results.seconds > 0


def test_single_rank_and_rank_env():
    def job(rank, world_size):
        return rank, world_size, os.environ["RANK"], os.environ["LOCAL_RANK"], dist.get_backend()
    assert launch(job, 1) == [(0, 1, "0", "0", "gloo")]
    assert [r[2] for r in launch(job, 3)] == ["0", "1", "2"]


def test_ranks_compute_with_one_thread_even_after_the_parent_used_openmp():
    torch.set_num_threads(2)
    torch.randn(256, 256) @ torch.randn(256, 256)  # the parent's OpenMP pool now exists

    def job(rank, world_size):
        x = torch.randn(256, 256)
        return torch.get_num_threads(), bool(torch.isfinite(x @ x).all())
    assert launch(job, 2, timeout=20) == [(1, True)] * 2


def test_back_to_back_jobs_do_not_collide():
    for i in range(8):
        assert launch(_all_reduce_job, 2, 1.0, show_output=False)[0].tolist() == [3.0, 3.0]


def test_two_jobs_at_once_from_two_processes():
    code = ("from helpers import launch; from tests.test_launch import _all_reduce_job\n"
            "for _ in range(5): assert launch(_all_reduce_job, 3, 1.0, show_output=False)[0].tolist() == [6.0, 6.0]\n"
            "print('ok')")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and all(o.strip() == "ok" for o in outs)


def test_raising_rank_is_named_with_its_traceback(tmp_path):
    def job(rank, world_size):
        _record_pid(tmp_path, rank)
        if rank == 2:
            raise ValueError("shapes do not match")
        dist.barrier()  # the other ranks would wait here forever without the launcher
    start = time.monotonic()
    with pytest.raises(RankFailed) as info:
        launch(job, 4)
    err = info.value
    assert (err.rank, err.exc_type, err.message) == (2, "ValueError", "shapes do not match")
    assert "rank 2 raised ValueError: shapes do not match" in str(err)
    assert 'raise ValueError("shapes do not match")' in err.remote_traceback  # the user's source line
    assert "helpers/launch.py" not in err.remote_traceback                 # not the launcher's frames
    assert time.monotonic() - start < 10
    assert len(_pids(tmp_path)) == 4 and not any(_alive(p) for p in _pids(tmp_path))
    assert not multiprocessing.active_children()  # the store process is gone too


def test_ranks_failing_at_once_print_nothing_but_their_error():
    """Every rank raises the moment it starts: no rank may be caught mid-rendezvous and log connection
    errors (the store outlives the ranks, and user code starts only once every rank is connected)."""
    def job(rank, world_size):
        raise NameError("name 'local_output' is not defined")
    for _ in range(10):
        with pytest.raises(RankFailed) as info:
            launch(job, 4, show_output=False)
        assert info.value.exc_type == "NameError" and info.value.outputs == [""] * 4


def test_hang_is_stopped_with_every_ranks_stack(tmp_path):
    def job(rank, world_size):
        _record_pid(tmp_path, rank)
        t = torch.zeros(1)
        if rank == 0:
            dist.all_reduce(t)       # rank 0 waits in all_reduce ...
        else:
            dist.broadcast(t, 0)     # ... the others in broadcast: a deadlock
    start = time.monotonic()
    with pytest.raises(JobTimeout) as info:
        launch(job, 3, timeout=2)
    assert time.monotonic() - start < 8
    stacks = info.value.stacks
    assert sorted(stacks) == [0, 1, 2]
    assert "dist.all_reduce(t)" in stacks[0] and "in all_reduce" in stacks[0]
    assert all("dist.broadcast(t, 0)" in stacks[r] for r in (1, 2))
    assert "rank 1" in str(info.value) and "timeout=2 s" in str(info.value)
    assert not any(_alive(p) for p in _pids(tmp_path))


@pytest.mark.parametrize("how,expected", [
    ("sys.exit", "raised SystemExit: 3"),
    ("os._exit", "exited with code 3"),
    ("os._exit(0)", "exited with code 0 before its function returned"),
    ("SIGKILL", "was killed by signal SIGKILL"),
    ("SIGSEGV", "was killed by signal SIGSEGV"),
])
def test_rank_that_exits_or_is_killed(tmp_path, how, expected):
    def job(rank, world_size):
        _record_pid(tmp_path, rank)
        if rank == 1:
            if how == "sys.exit":
                sys.exit(3)
            elif how == "os._exit":
                os._exit(3)
            elif how == "os._exit(0)":
                os._exit(0)  # "success" without a result is still a failure
            else:
                os.kill(os.getpid(), getattr(signal, how))
        dist.barrier()
    with pytest.raises(RankFailed) as info:
        launch(job, 3)
    assert info.value.rank == 1, str(info.value)
    assert expected in str(info.value)
    assert not any(_alive(p) for p in _pids(tmp_path))


def test_unpicklable_result_is_reported():
    with pytest.raises(RankFailed, match="could not be sent back"):
        launch(lambda rank, world_size: (lambda: None), 2)


class _FailsToUnpickle:
    def __reduce__(self):
        return int, ("not a number",)  # pickles in the rank; raises ValueError when the parent unpickles it


def test_result_that_cannot_be_unpickled_in_the_parent_names_the_rank():
    def job(rank, world_size):
        return _FailsToUnpickle() if rank == 1 else rank
    with pytest.raises(RankFailed) as info:
        launch(job, 2)
    assert info.value.rank == 1 and "cannot be unpickled" in str(info.value)
    assert "ValueError" in str(info.value)


def test_rank_that_returns_while_a_peer_waits_in_a_collective_is_blamed():
    """Rank 1 leaves without the all_reduce rank 0 waits in: gloo tells rank 0 "Connection closed by peer,
    ... caused by a remote worker crashing"; the launcher names rank 1, which returned, and the collective."""
    def job(rank, world_size):
        if rank == 0:
            dist.all_reduce(torch.zeros(4))
        return rank
    with pytest.raises(RankFailed) as info:
        launch(job, 2, timeout=20, show_output=False)
    err = info.value
    assert err.rank == 1, str(err)
    assert str(err).startswith("rank 1 returned while rank 0 waited in all_reduce"), str(err)
    assert "dist.all_reduce(torch.zeros(4))" in err.remote_traceback  # where rank 0 waited


def test_mismatched_shapes_report_gloos_explanation():
    def job(rank, world_size):
        dist.all_reduce(torch.zeros(4 if rank == 0 else 8))
    with pytest.raises(RankFailed) as info:
        launch(job, 2, timeout=20, show_output=False)
    text = str(info.value)
    assert "killed by signal SIGABRT" in text and "in all_reduce" in text, text
    assert "size doesn't match" in text and "tensors of different sizes" in text, text
    assert "dist.all_reduce(torch.zeros(4 if rank == 0 else 8))" in info.value.remote_traceback


def test_runaway_output_is_capped_with_a_note(capsys):
    def job(rank, world_size):
        if rank == 1:
            line = "x" * 99 + "\n"
            for _ in range(100_000):  # 10 MB
                sys.stdout.write(line)
            print("last line")
        return rank
    results = launch(job, 2, timeout=30)
    assert results == [0, 1]
    out = results.outputs[1]
    assert len(out) < 2.1e6 and "bytes of this rank's output omitted" in out
    assert out.startswith("x" * 99) and out.endswith("last line\n")
    assert len(capsys.readouterr().out) < 2.5e6


def test_course_timeout_is_read_when_a_job_starts(monkeypatch):
    """The graders' conftest sets COURSE_TIMEOUT after helpers.launch was imported; it must still apply."""
    monkeypatch.setenv("COURSE_TIMEOUT", "1.5")
    start = time.monotonic()
    with pytest.raises(JobTimeout) as info:
        launch(lambda rank, world_size: time.sleep(60), 1, show_output=False)
    assert info.value.timeout == 1.5 and time.monotonic() - start < 15
    monkeypatch.setenv("COURSE_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="COURSE_TIMEOUT"):
        launch(print, 1)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(fn=42, world_size=2), TypeError, "not callable"),
    (dict(fn=print, world_size=0), ValueError, "at least one process"),
    (dict(fn=print, world_size=-3), ValueError, "at least one process"),
    (dict(fn=print, world_size=2.5), TypeError, "whole number"),
    (dict(fn=print, world_size=True), TypeError, "whole number"),
    (dict(fn=print, world_size=2, backend="mpi"), ValueError, "use 'gloo'"),
    (dict(fn=print, world_size=2, timeout=0), ValueError, "positive number"),
])
def test_bad_arguments_are_rejected_before_any_process_starts(kwargs, error, match):
    with pytest.raises(error, match=match):
        launch(kwargs.pop("fn"), kwargs.pop("world_size"), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_nccl_without_gpus_says_why():
    with pytest.raises(ValueError, match="one GPU per rank"):
        launch(print, 2, backend="nccl")


def test_kernel_stays_usable_after_failures():
    with pytest.raises(RankFailed):
        launch(lambda rank, world_size: 1 / 0, 2)
    assert launch(_all_reduce_job, 2, 1.0, show_output=False)[1].tolist() == [3.0, 3.0]


def test_distributed_magic_runs_a_cell_on_every_rank(capsys):
    from helpers.magic import run_cell
    run_cell("t = torch.tensor([float(rank)]) * factor\ndist.all_reduce(t)\nprint(int(t.item()))", 3,
             {"factor": 10})
    assert capsys.readouterr().out.splitlines() == ["[rank 0] 30", "[rank 1] 30", "[rank 2] 30"]


def test_a_rank_that_leaves_a_forked_process_behind_still_finishes(tmp_path):
    """The forked child inherits the rank's end of multiprocessing's sentinel pipe; the launcher must see the
    rank end anyway (it waits on the process itself), not report a hang."""
    def job(rank, world_size):
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        (tmp_path / f"child{rank}").write_text(str(child))
        return rank
    try:
        assert launch(job, 2, timeout=20) == [0, 1]
    finally:
        for p in tmp_path.glob("child*"):
            try:
                os.kill(int(p.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def test_proctree_walks_and_kills_a_tree(tmp_path):
    """helpers.proctree (the launcher's, the server's and the tests' process-tree helpers): a child that forked a
    grandchild is found with it, killed with it, and reaped."""
    child = os.fork()
    if child == 0:
        grandchild = os.fork()
        if grandchild == 0:
            time.sleep(60)
            os._exit(0)
        (tmp_path / "grandchild").write_text(str(grandchild))
        time.sleep(60)
        os._exit(0)
    deadline = time.monotonic() + 10
    while not (tmp_path / "grandchild").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    grandchild = int((tmp_path / "grandchild").read_text())
    assert proctree.descendants(child) == [grandchild] and proctree.parent(grandchild) == child
    assert child in proctree.descendants(os.getpid()) and proctree.alive(child)
    assert sorted(proctree.kill_tree(child)) == sorted([child, grandchild])
    assert not proctree.wait_gone([child, grandchild], timeout=10), "kill_tree left a process of the tree"
    assert proctree.reap(child) == [], "wait_gone reaped our child"


def test_proctree_stop_session_ends_a_server_that_ignores_sigterm_and_its_stragglers(tmp_path):
    """proctree.stop_session (how helpers/bench_serve.py and helpers/vllm_cluster.py stop vllm serve): a session
    whose processes ignore SIGTERM is killed after the grace period, and so is a child that left its group."""
    written = tmp_path / "straggler"
    script = f"trap '' TERM; setsid sleep 60 & echo $! > {written}; sleep 60 & wait"
    proc = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not (written.exists() and written.read_text().strip()):
            assert time.monotonic() < deadline, "the test's bash never started its straggler"
            time.sleep(0.01)
        straggler = int(written.read_text())
        tree = [proc.pid, *proctree.descendants(proc.pid)]
        assert straggler in tree and len(tree) >= 3, tree
        proctree.stop_session(proc, grace=0.5)
        assert proc.returncode == -signal.SIGKILL, f"bash ignores SIGTERM: SIGKILL after the grace; {proc.returncode}"
        assert not [p for p in tree if proctree.alive(p)], "stop_session left a process of the session's tree"
    finally:
        if proc.poll() is None:
            proctree.kill_tree(proc.pid)
            proc.wait()
