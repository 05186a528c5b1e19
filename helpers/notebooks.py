"""Execute chapter notebooks top to bottom: store their outputs (what nbval later compares), or time them.

    python -m helpers.notebooks notebooks/00_processes_and_ranks.ipynb   # one
    python -m helpers.notebooks                                          # all of them

Runs with COURSE_IMPL=solutions, like CI, in a fresh kernel from this environment, so the stored outputs
are exactly what a fresh "Restart and Run All" prints with finished exercises. `run(path, impl="labs")` is
the learner's Run All instead (labs/ as it is, unwritten exercises falling back to the reference answers):
tests/test_learner_path.py uses it, and `make bench` times every notebook with `run(path)`.
"""
from __future__ import annotations

import asyncio
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
from nbclient.exceptions import CellExecutionComplete, CellTimeoutError
from nbclient.client import timestamp
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

    # A cell's execute_reply (and its iopub output) is awaited in 1 s polls, never in one poll as long as the
    # cell's timeout. Issue 22's 620 s: a labs-mode Run All of chapter 5 sat idle for the whole 600 s cell timeout
    # after its widget cell, then went on and passed (reproduced at load 5-7: 623 s). The kernel had executed the
    # cell and was idle (it answered a fresh client at once); nbclient was in one 600 s poll of the shell socket.
    # pyzmq's asyncio poll waits for the socket's edge-triggered descriptor, and checks the socket itself only when
    # that fires or the timeout ends: a missed wake-up costs the whole timeout, after which the reply that had been
    # there all along is read. A poll per second asks the socket every second. And a request the kernel has not
    # started after 5 s (no iopub message for it: ipykernel 7's shell socket can strand a request until another
    # message arrives, ipython/ipykernel#1554) is nudged with a kernel_info request.
    POLL_SLICE_S = 1.0
    NUDGE_AFTER_S = 5.0

    async def _async_poll_output_msg(self, parent_msg_id, cell, cell_index):
        while True:
            try:
                msg = await ensure_async(self.kc.iopub_channel.get_msg(timeout=self.POLL_SLICE_S))
            except Empty:
                continue
            if msg["parent_header"].get("msg_id") == parent_msg_id:
                try:
                    self.process_message(msg, cell, cell_index)     # raises CellExecutionComplete at the end
                except CellExecutionComplete:
                    return

    def process_message(self, msg, cell, cell_index):
        self._iopub_seen = True
        return super().process_message(msg, cell, cell_index)

    async def _async_poll_for_reply(self, msg_id, cell, timeout, task_poll_output_msg, task_poll_kernel_alive):
        deadline = None if timeout is None else time.monotonic() + timeout
        sent, self._iopub_seen, nudged = time.monotonic(), False, 0
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                task_poll_kernel_alive.cancel()
                await self._async_check_alive()
                reply = await self._async_handle_timeout(timeout, cell)      # raises unless configured not to
                if reply:
                    reply["parent_header"] = {"msg_id": msg_id}
                    return reply
                continue
            try:
                msg = await ensure_async(self.kc.shell_channel.get_msg(
                    timeout=self.POLL_SLICE_S if left is None else min(self.POLL_SLICE_S, left)))
            except Empty:
                waited = time.monotonic() - sent
                if not self._iopub_seen and waited > self.NUDGE_AFTER_S * (nudged + 1):
                    self.kc.kernel_info()       # its reply is not ours: skipped below
                    nudged += 1
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if self.record_timing:
                cell["metadata"]["execution"]["shell.execute_reply"] = timestamp(msg)
            try:
                await asyncio.wait_for(task_poll_output_msg, self.iopub_timeout)
            except (asyncio.TimeoutError, Empty):
                if self.raise_on_iopub_timeout:
                    task_poll_kernel_alive.cancel()
                    raise CellTimeoutError.error_from_timeout_and_cell(
                        "Timeout waiting for IOPub output", self.iopub_timeout, cell) from None
                self.log.warning("Timeout waiting for IOPub output")
            task_poll_kernel_alive.cancel()
            return msg


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


def main(argv=None):
    args = (argv if argv is not None else sys.argv[1:]) or [str(p) for p in notebook_paths()]
    for name in args:
        seconds = execute(pathlib.Path(name).resolve())
        print(f"{name}: executed in {seconds:.1f} s")


if __name__ == "__main__":
    main()
