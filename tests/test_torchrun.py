"""The same worker functions run under torchrun: one node, and two "nodes" on loopback with c10d rendezvous."""
import os
import socket
import subprocess
import sys

import pytest

ENV = dict(os.environ, OMP_NUM_THREADS="1", COURSE_IMPL=os.environ.get("COURSE_IMPL", "solutions"))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_helpers_run_refuses_to_start_without_torchrun():
    out = subprocess.run([sys.executable, "-m", "helpers.run", "helpers.examples:whoami"],
                         capture_output=True, text=True, env=ENV)
    assert out.returncode != 0 and "started by torchrun" in out.stderr


@pytest.mark.slow
def test_one_node():
    out = subprocess.run(TORCHRUN + ["--standalone", "--nproc_per_node=2", "-m", "helpers.run",
                                     "helpers.examples:chapter_check"],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for rank in range(2):
        assert f"[rank {rank}] returned 'ok: sum_of_ranks=1, ring_pass got {(rank - 1) % 2}'" in out.stdout


@pytest.mark.slow
def test_two_nodes_on_loopback():
    """Two torchrun agents, each a "node" with 2 processes, meet through c10d rendezvous: world size 4."""
    endpoint = f"127.0.0.1:{_free_port()}"
    cmd = TORCHRUN + ["--nnodes=2", "--nproc_per_node=2", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}",
                      "--rdzv_id=course-test", "--max_restarts=0",
                      "-m", "helpers.run", "helpers.examples:chapter_check"]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]
    try:
        outs = [node.communicate(timeout=180) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(err[-1500:] for _, err in outs)
    stdout = "".join(out for out, _ in outs)
    for rank in range(4):
        assert f"[rank {rank}] returned 'ok: sum_of_ranks=6, ring_pass got {(rank - 1) % 4}'" in stdout
