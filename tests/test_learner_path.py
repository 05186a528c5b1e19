"""The learner's path in a real Jupyter kernel (labs mode): an unwritten exercise does not stop the chapter
(one line says which exercise and that the reference answer ran), and an edit in labs/ is used the next time
the cell runs, without a kernel restart. Graders never fall back (tests/test_stubs.py, tests/test_grade.py).

Run All in labs mode, notebook by notebook (`test_run_all_in_labs_mode`): nbval already runs every notebook
once with the reference answers, and a second Run All of all of them would add about as much again to
`make test`. So `make test` runs the chapters in LABS_RUN_IN_MAKE_TEST (chosen to cover every way a stub is
reached: functions and classes, in the kernel and inside ranks, exercises of earlier chapters and exercises
called by given code), and `make test-labs` runs every notebook (COURSE_LABS_RUN_ALL=1)."""
import os
import pathlib
import re
import shutil
import textwrap

import nbformat
import pytest

from helpers import notebooks
from helpers.impl import unwritten_exercises

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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COURSE_IMPL", "COURSE_FALLBACK"))}
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


PAGED_ALLOCATE = textwrap.dedent('''
    def allocate(self, seq_id, num_tokens: int) -> list[int]:
        print("learner's allocate ran")
        raise MemoryError("not this one")
''')


def _messages(client, code):
    """Execute `code`; return its outputs in order: ("stream", text) and ("result", text/plain)."""
    msg_id = client.execute(code)
    out = []
    while True:
        msg = client.get_iopub_msg(timeout=120)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out.extend(("stream", line) for line in content["text"].splitlines())
        elif kind == "execute_result":
            out.append(("result", content["data"]["text/plain"]))
        elif kind == "error":
            raise AssertionError("\n".join(content["traceback"]))
        elif kind == "status" and content["execution_state"] == "idle":
            return out


def test_one_fallback_line_per_file_per_cell_before_the_value_and_partial_classes(kernel):
    """A cell that loads a module many times, in the kernel and in its ranks, says so once, above its value;
    the next cell says it again (once). A class with some methods written names the ones still missing."""
    client, lab_file = kernel
    cell = CELL + textwrap.dedent("""
        for _ in range(3):
            load_impl("warmup")
        launch(job, 2)
        True
    """)
    for _ in range(2):                                            # each cell says it once
        out = _messages(client, cell)
        lines = [text for kind, text in out if kind == "stream" and "not written yet" in text]
        assert len(lines) == 1, f"one fallback line per file per cell:\n{out}"
        kinds = [kind for kind, _ in out]
        assert kinds[-1] == "result" and out[-1][1] == "True", out
        assert out.index(("stream", lines[0])) < kinds.index("result"), f"the line goes above Out[n]:\n{out}"

    paged = lab_file.parent / "paged_kv_cache.py"
    source = (ROOT / "labs" / "paged_kv_cache.py").read_text()
    start = source.index("    def allocate(")
    end = source.index("    def append_slot(")
    paged.write_text(source[:start] + textwrap.indent(PAGED_ALLOCATE.strip(), "    ") + "\n\n" + source[end:])
    out = _run(client, 'pkv = load_impl("paged_kv_cache")\n'
                       'print(pkv.BlockManager(4, 2).allocate("a", 3))')
    line = next(line for line in out.splitlines() if "not written yet" in line)
    assert FALLBACK_LINE.fullmatch(line), line
    assert "BlockManager: append_slot, free still missing, so your allocate waits too" in line, line
    assert "learner's allocate ran" not in out and "[0, 1]" in out, out


# Chapter 5 loads exercises of chapters 2, 3 and 5, some of them only through other exercises' code inside 8
# ranks; chapter 8 falls back for classes and functions, in the kernel and in the ranks. Both are quick.
LABS_RUN_IN_MAKE_TEST = {"05_hybrid_parallel", "08_experts_and_long_context"}
RUN_ALL = os.environ.get("COURSE_LABS_RUN_ALL") not in (None, "", "0")
FALLBACK_LINE = re.compile(r"(\[rank 0\] )?((Exercise \d+\.\d+)(, Exercise \d+\.\d+)*) not written yet in "
                           r"labs/([\w/]+)\.py( \([^()]+\))?: this \w+ (uses|balances with) the reference answer "
                           r"\(solutions/\)\.")


def _streams(cell, name):
    return "".join(out.get("text", "") for out in cell.get("outputs", [])
                   if out.get("output_type") == "stream" and out.get("name") == name)


@pytest.mark.slow
@pytest.mark.parametrize("path", notebooks.notebook_paths(), ids=lambda p: p.stem)
def test_run_all_in_labs_mode(path):
    """Restart and Run All with labs/ as it is: every cell runs, no error; each unwritten exercise the notebook
    reaches is announced in one line (which exercises, which file), never silently replaced."""
    if not RUN_ALL and path.stem not in LABS_RUN_IN_MAKE_TEST:
        pytest.skip("labs-mode Run All of this notebook runs in `make test-labs` (COURSE_LABS_RUN_ALL=1)")
    result = notebooks.run(path, impl="labs")
    nb = result.notebook
    assert not notebooks.error_outputs(nb) and not result.stopped, \
        f"{path.name} stopped in labs mode: {result.stopped} {notebooks.error_outputs(nb)}"
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    assert all(nb.cells[i].get("execution_count") for i in code), "Run All did not reach every code cell"

    stored = nbformat.read(path, as_version=4)
    announced = {}
    for i in code:
        for line in (_streams(nb.cells[i], "stdout") + _streams(nb.cells[i], "stderr")).splitlines():
            if "not written yet" in line:
                match = FALLBACK_LINE.fullmatch(line)
                assert match, f"cell {i}: the fallback must be one line from rank 0 in the usual words: {line!r}"
                announced.setdefault(match[5], set()).update(re.findall(r"\d+\.\d+", match[2]))
        # With the reference answers in place of the stubs, every claim holds as in the stored run.
        failed = [line for line in _streams(nb.cells[i], "stdout").splitlines()
                  if re.match(r"(\[rank \d+\] )?✗", line)]
        assert not failed, f"cell {i}: a claim fails in labs mode: {failed}"
        # The fallback adds nothing to stderr (no warning, no traceback) where the reference run wrote nothing.
        if _streams(nb.cells[i], "stderr").strip() and not _streams(stored.cells[i], "stderr").strip():
            raise AssertionError(f"cell {i} writes to stderr in labs mode only:\n{_streams(nb.cells[i], 'stderr')}")

    stubs = {}
    for module in set(re.findall(r'load_impl\("([\w.]+)"\)', "".join(c.source for c in nb.cells))):
        file = ROOT / "labs" / (module.replace(".", "/") + ".py")
        found = {re.match(r"Exercise (\d+\.\d+)", m)[1] for m in unwritten_exercises(file).values()}
        if found:
            stubs[module.replace(".", "/")] = found
    for module, exercises in announced.items():
        assert (ROOT / "labs" / f"{module}.py").exists(), f"the fallback names labs/{module}.py, which does not exist"
        file_stubs = {re.match(r"Exercise (\d+\.\d+)", m)[1]
                      for m in unwritten_exercises(ROOT / "labs" / f"{module}.py").values()}
        assert exercises == file_stubs, f"labs/{module}.py: announced {exercises}, unwritten {file_stubs}"
    silent = {module: found for module, found in stubs.items() if module not in announced}
    assert not silent, f"{path.name} used the reference for {silent} without saying so"


def test_a_cells_reply_is_polled_every_second_and_an_unstarted_request_nudged(monkeypatch):
    """The 620 s of issue 22: one 600 s poll of the shell socket that missed its wake-up. The Run All client
    polls in 1 s slices (a reply that is there is read within one) and nudges a request the kernel has not
    started with kernel_info."""
    import asyncio
    from queue import Empty

    import nbformat.v4

    class Shell:
        def __init__(self):
            self.polls = []

        async def get_msg(self, timeout=None):
            self.polls.append(timeout)
            if len(self.polls) < 4:
                raise Empty
            if len(self.polls) == 4:
                return {"parent_header": {"msg_id": "another request"}}
            return {"parent_header": {"msg_id": "mine"}, "header": {}}

    class Kernel:
        shell_channel, nudges = Shell(), 0

        def kernel_info(self):
            Kernel.nudges += 1

    client = notebooks._Client(nbformat.v4.new_notebook(), record_timing=False)
    client.kc = Kernel()
    monkeypatch.setattr(notebooks._Client, "NUDGE_AFTER_S", 0.0)

    async def run():
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)                        # the cell's iopub output: already complete
        alive = asyncio.ensure_future(asyncio.sleep(60))
        return await client._async_poll_for_reply("mine", nbformat.v4.new_code_cell("1"), 600, done, alive)

    reply = asyncio.run(run())
    assert reply["parent_header"]["msg_id"] == "mine"
    assert max(Kernel.shell_channel.polls) <= notebooks._Client.POLL_SLICE_S, Kernel.shell_channel.polls
    assert Kernel.nudges >= 1
