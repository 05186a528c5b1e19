"""Shared fixtures. Grader tests get the implementation under test with `load_impl(...)` inside the test,
so a missing or broken module fails that test, not the whole collection."""
import os

# Graders run many small jobs: a hung exercise should fail in seconds, not the teaching default of 60 s.
# launch() reads COURSE_TIMEOUT at each call, so this applies although helpers.launch is imported earlier
# (by the grade plugin, `-p helpers.grade`).
os.environ.setdefault("COURSE_TIMEOUT", "30")
# The test process never falls back to the reference answers. nbval imports ipykernel into this process, which
# would otherwise switch the notebook fallback on (helpers/impl.py) and let a labs stub be replaced in place.
# Kernels the tests start (nbval, tests/test_learner_path.py) decide for themselves: the learner-path tests
# remove COURSE_FALLBACK from their kernels' environment.
os.environ.setdefault("COURSE_FALLBACK", "0")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run the tiny Llama on one torch thread in this process (a module asks with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`): a 0.85 M-parameter model gains nothing from a second
    thread, and on a busy 2-core machine, with replicas spinning beside it, the threads' hand-offs made 32 decode
    steps take ~10 s instead of ~0.3 s."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------- widgets, after nbval's Run All
# nbval runs each notebook's cells in one kernel but never moves a slider. After a notebook's last cell, in the
# same kernel (no second Run All), one more item moves every control of every `interact` view through its values
# and fails on any exception (helpers.widgets.drive_widgets): a view whose function reads a global that a later
# cell reassigned breaks only there.
import json  # noqa: E402

_DRIVE = """
import json as _json, sys as _sys
_report = {"problems": [], "calls": 0}
if "ipywidgets" in _sys.modules:           # no widget without it: a notebook without any pays nothing
    from helpers.widgets import drive_widgets as _drive_widgets
    _report = {"problems": _drive_widgets(), "calls": _drive_widgets.calls}
print("WIDGETS " + _json.dumps(_report))
"""


class WidgetsItem(pytest.Item):
    """`notebooks/NN_x.ipynb::widgets`: runs in the kernel nbval kept for the notebook's cells."""

    def runtest(self):
        kernel = self.parent.kernel
        if kernel is None or not kernel.is_alive():
            pytest.skip("the notebook's kernel is gone (a cell timed out or crashed it)")
        msg_id = kernel.execute_cell_input(_DRIVE, allow_stdin=False)
        text, error = [], None
        while True:
            msg = kernel.get_message("iopub", timeout=300)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream" and content["name"] == "stdout":
                text.append(content["text"])
            elif kind == "error":
                error = f"{content['ename']}: {content['evalue']}"
            elif kind == "status" and content["execution_state"] == "idle":
                break
        assert error is None, f"driving the widgets raised {error}"
        line = next((ln for ln in "".join(text).splitlines() if ln.startswith("WIDGETS ")), None)
        assert line, f"no report from the widget driver: {''.join(text)[-2000:]}"
        report = json.loads(line[len("WIDGETS "):])
        self.user_properties.append(("widget_calls", report["calls"]))
        assert not report["problems"], f"{len(report['problems'])} widget call(s) raised:\n" + \
            "\n".join(report["problems"][:20])

    def reportinfo(self):
        return self.path, None, f"{self.path.name}::widgets"


def pytest_collection_modifyitems(session, config, items):
    """Append a WidgetsItem after the last cell of every notebook nbval collected."""
    out, last_parent = [], None
    for item in items:
        parent = item.parent if type(item).__name__ == "IPyNbCell" else None
        if last_parent is not None and parent is not last_parent:
            out.append(WidgetsItem.from_parent(last_parent, name="widgets"))
        out.append(item)
        last_parent = parent
    if last_parent is not None:
        out.append(WidgetsItem.from_parent(last_parent, name="widgets"))
    items[:] = out
