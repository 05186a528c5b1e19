"""The learner's path in a real Jupyter kernel (labs mode): an unwritten exercise does not stop the chapter
(one line says which exercise and that the reference answer ran), and an edit in labs/ is used the next time
the cell runs, without a kernel restart. Graders never fall back (tests/test_stubs.py, tests/test_grade.py)."""
import os
import pathlib
import shutil
import sys
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

CELL = textwrap.dedent("""
    from helpers import launch, load_impl
    def job(rank, world_size):
        return load_impl("warmup").sum_of_ranks(rank, world_size)
    results = launch(job, 2)
    print("results", list(results))
""")

WRITTEN = textwrap.dedent('''
    def sum_of_ranks(rank, world_size):
        """Exercise 0.1 (the learner's own answer)."""
        t = torch.tensor([rank], dtype=torch.int64)
        dist.all_reduce(t)
        print("learner's code ran")
        return int(t.item())
''')


def _run(client, code):
    """Execute `code` in the kernel; return its stdout text, failing on an error."""
    msg_id = client.execute(code)
    out, error = [], None
    while True:
        msg = client.get_iopub_msg(timeout=120)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out.append(content["text"])
        elif kind == "error":
            error = "\n".join(content["traceback"])
        elif kind == "status" and content["execution_state"] == "idle":
            break
    assert error is None, error
    return "".join(out)


@pytest.fixture
def kernel(tmp_path):
    from jupyter_client.manager import start_new_kernel
    labs = tmp_path / "labs"
    labs.mkdir()
    (labs / "__init__.py").write_text("")
    shutil.copy(ROOT / "labs" / "warmup.py", labs / "warmup.py")
    env = {k: v for k, v in os.environ.items() if k not in ("COURSE_IMPL", "COURSE_FALLBACK")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])   # this copy of labs/ shadows the repo's
    manager, client = start_new_kernel(kernel_name="python3", cwd=str(tmp_path), env=env)
    try:
        yield client, labs / "warmup.py"
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def test_unwritten_exercise_falls_back_then_an_edit_is_picked_up(kernel):
    client, lab_file = kernel
    first = _run(client, CELL)
    assert "Exercise 0.1, Exercise 0.2 not written yet in labs/warmup.py: this run uses the reference answer" \
        in first, first
    assert "results [1, 1]" in first
    assert first.count("not written yet") == 1, f"one line, from rank 0 only:\n{first}"

    source = lab_file.read_text()
    start = source.index("def sum_of_ranks")
    end = source.index("def ring_pass")
    lab_file.write_text(source[:start] + WRITTEN.lstrip() + "\n\n" + source[end:])
    second = _run(client, CELL)                                   # same kernel: no restart
    assert "learner's code ran" in second, second
    assert "Exercise 0.1" not in second, f"0.1 is written now; only 0.2 may fall back:\n{second}"
    assert "Exercise 0.2 not written yet" in second
    assert "results [1, 1]" in second
