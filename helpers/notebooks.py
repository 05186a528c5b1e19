"""Execute chapter notebooks top to bottom: store their outputs (what nbval later compares), or time them.

    python -m helpers.notebooks notebooks/00_processes_and_ranks.ipynb   # one
    python -m helpers.notebooks                                          # all of them

Runs with COURSE_IMPL=solutions, like CI, in a fresh kernel from this environment, so the stored outputs
are exactly what a fresh "Restart and Run All" prints with finished exercises. `run(path, impl="labs")` is
the learner's Run All instead (labs/ as it is, unwritten exercises falling back to the reference answers):
tests/test_learner_path.py uses it, and `make bench` times every notebook with `run(path)`.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import re
from queue import Empty
import sys
import time

import nbformat
from nbclient import NotebookClient
from nbclient.util import ensure_async

ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class NotebookRun:
    notebook: nbformat.NotebookNode     # the notebook with the outputs of this run
    seconds: float                      # Run All, wall time, kernel start-up included
    cell_seconds: dict[int, float]      # code cell index -> its execution time
    stopped: str | None = None          # why Run All stopped early (an error cell, a cell timeout), else None
    outside_cells: float = 0.0          # seconds not spent in cells: kernel start-up, shut-down, waits between

    def slowest_cell(self) -> tuple[int, float]:
        return max(self.cell_seconds.items(), key=lambda item: item[1], default=(-1, 0.0))


class _Client(NotebookClient):
    """nbclient's client, with the one wait outside any cell bounded: the reply to the kernel_info request
    sent after start-up. nbclient waits for it as long as for a cell (600 s) and then goes on without it; twice,
    on the busy 2-core machine, a Run All spent one whole such timeout outside its cells. Without the reply the
    notebook keeps the language_info it has stored."""
    KERNEL_INFO_WAIT_S = 60

    async def async_wait_for_reply(self, msg_id, cell=None):
        if cell is not None:
            return await super().async_wait_for_reply(msg_id, cell)
        deadline = time.monotonic() + self.KERNEL_INFO_WAIT_S
        while time.monotonic() < deadline:
            try:
                msg = await ensure_async(self.kc.shell_channel.get_msg(timeout=self.shell_timeout_interval))
            except Empty:
                await self._async_check_alive()
                continue
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg
        self.log.warning("no kernel_info reply within %s s: going on without it", self.KERNEL_INFO_WAIT_S)
        return None


def notebook_paths() -> list[pathlib.Path]:
    return sorted((ROOT / "notebooks").glob("*.ipynb"))


def run(path, impl: str = "solutions", timeout: int = 600) -> NotebookRun:
    """Run All of one notebook in a fresh kernel with COURSE_IMPL=`impl` ("labs": the learner's default, with
    the fallback of helpers/impl.py). The kernel stops at the first error, like Run All in JupyterLab; the
    error is in the returned notebook's outputs and `stopped` says why (nothing is raised)."""
    path = pathlib.Path(path).resolve()
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:               # a cell Run All never reaches keeps no stale output
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COURSE_IMPL", "COURSE_FALLBACK"))}
    if impl != "labs":
        env["COURSE_IMPL"] = impl
    client = _Client(nb, timeout=timeout, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    stopped = None
    try:
        client.execute(env=env)
    except Exception as exc:    # CellExecutionError, CellTimeoutError: Run All stops there, as in JupyterLab
        last = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines() or [""]      # without ANSI colours
        stopped = f"{type(exc).__name__}: {last[-1]}"
    seconds = time.perf_counter() - start
    cells = _cell_seconds(nb)
    return NotebookRun(nb, seconds, cells, stopped, max(0.0, seconds - sum(cells.values())))


def _cell_seconds(nb) -> dict[int, float]:
    found = {}
    for index, cell in enumerate(nb.cells):
        timing = cell.get("metadata", {}).get("execution", {})
        if cell.cell_type == "code" and "iopub.execute_input" in timing and "shell.execute_reply" in timing:
            begin, end = (datetime.datetime.fromisoformat(timing[k].replace("Z", "+00:00"))
                          for k in ("iopub.execute_input", "shell.execute_reply"))
            found[index] = (end - begin).total_seconds()
    return found


def error_outputs(nb) -> list[tuple[int, str]]:
    """(cell index, "ename: evalue") of every error output of an executed notebook."""
    return [(index, f"{out.get('ename')}: {out.get('evalue')}")
            for index, cell in enumerate(nb.cells) if cell.cell_type == "code"
            for out in cell.get("outputs", []) if out.get("output_type") == "error"]


def execute(path: pathlib.Path, timeout: int = 600) -> float:
    """Run All with the reference answers and store the outputs in the notebook; an error cell raises."""
    path = pathlib.Path(path).resolve()
    result = run(path, impl="solutions", timeout=timeout)
    if result.stopped:
        raise RuntimeError(f"{path.name}: Run All stopped ({result.stopped}); outputs not stored")
    result.notebook.metadata.pop("widgets", None)  # widget state is random model ids: not worth storing
    nbformat.write(result.notebook, path)
    return result.seconds


def control_values(control) -> list:
    """The values a check moves one control through: every option of a dropdown (or radio buttons), the first,
    middle and last of a selection slider, the minimum, a middle value and the maximum of a numeric slider,
    both states of a checkbox."""
    import ipywidgets
    options = getattr(control, "options", None)
    if options is not None:
        values = [value for _, value in control._options_full] if hasattr(control, "_options_full") else \
            [o[1] if isinstance(o, tuple) else o for o in options]
        if isinstance(control, ipywidgets.SelectionSlider):
            values = list(dict.fromkeys([values[0], values[len(values) // 2], values[-1]]))
        return values
    if isinstance(control.value, bool):
        return [False, True]
    if hasattr(control, "min") and hasattr(control, "max") and not isinstance(control.value, tuple):
        low, high = control.min, control.max
        step = getattr(control, "step", None) or 1
        middle = low + round((high - low) / 2 / step) * step
        return list(dict.fromkeys([low, type(low)(middle), high]))
    return [control.value]


def drive_widgets() -> list[str]:
    """Run in a kernel after Run All: move every control of every live `interact`/`interactive` through its
    values (one control at a time, the others at their defaults) and call the view as a slider move does.
    Returns one line per failure, "<function>(<kwargs>): <exception>"; empty when every call ran.

    A view's function runs long after its cell, when later cells may have reassigned the globals it reads
    (chapter 8's capacity explorer read `block`, which a later cell made an int): this is what catches it."""
    import sys

    import ipywidgets
    import matplotlib.pyplot as plt
    from IPython import get_ipython
    from ipywidgets.widgets.widget import _instances

    shell = get_ipython()
    problems, raised = [], []
    drive_widgets.calls = 0

    def record(*args, **kwargs):        # interactive.update catches the error and shows it: keep it instead
        raised.append(sys.exc_info()[1])

    original = shell.showtraceback
    shell.showtraceback = record
    try:
        for view in [w for w in list(_instances.values()) if isinstance(w, ipywidgets.interactive)]:
            name = getattr(view.f, "__name__", repr(view.f))
            controls = list(view.kwargs_widgets)
            for control in controls:         # moved by hand below, one call per value
                control.unobserve(view.update, names="value")
            try:
                for control in controls:
                    default = control.value
                    for value in control_values(control):
                        control.value = value
                        raised.clear()
                        view.update()
                        drive_widgets.calls += 1
                        kwargs = ", ".join(f"{c._kwarg}={c.value!r}" for c in controls)
                        problems += [f"{name}({kwargs}): {type(e).__name__}: {e}" for e in raised]
                        plt.close("all")
                    control.value = default
            finally:
                for control in controls:
                    control.observe(view.update, names="value")
    finally:
        shell.showtraceback = original
    return problems


def main(argv=None):
    args = (argv if argv is not None else sys.argv[1:]) or [str(p) for p in notebook_paths()]
    for name in args:
        seconds = execute(pathlib.Path(name).resolve())
        print(f"{name}: executed in {seconds:.1f} s")


if __name__ == "__main__":
    main()
