"""Run All of every chapter notebook in a fresh kernel, with the implementation helpers/bench.py chose (the
reference answers by default; `--impl labs`: the learner's mode, unwritten exercises falling back): the wall
time of each notebook (kernel start-up and shut-down included; "outside cells" shows them apart) and its
slowest cell, against the course's budget of 60 s per notebook and 20 s per cell on the 2-core machine.
Nothing is stored: the notebooks on disk keep their outputs.

    python -m helpers.bench notebooks
"""
from helpers import notebooks
from helpers.impl import impl_package

NOTEBOOK_BUDGET_S, CELL_BUDGET_S = 60, 20


def _first_line(cell) -> str:
    line = next((l for l in cell.source.splitlines() if l.strip() and not l.lstrip().startswith("#")), "")
    return line.strip()[:48]


def run(paths=None):
    paths = paths or notebooks.notebook_paths()
    impl = impl_package()
    print(f"Run All in a fresh kernel, one notebook at a time, with {impl}/")
    print(f"{'notebook':30} {'Run All':>8} {'outside cells':>13} {'slowest cell':>13}  first line of the slowest cell")
    total, over = 0.0, []
    for path in paths:
        result = notebooks.run(path, impl=impl)
        index, seconds = result.slowest_cell()
        name = getattr(path, "stem", str(path))
        status = f"  STOPPED: {result.stopped}" if result.stopped else ""
        print(f"{name:30} {result.seconds:6.1f} s {result.outside_cells:11.1f} s {seconds:6.1f} s [{index:>2}]  "
              f"{_first_line(result.notebook.cells[index]) if index >= 0 else ''}{status}", flush=True)
        total += result.seconds
        if result.seconds > NOTEBOOK_BUDGET_S or seconds > CELL_BUDGET_S or result.stopped:
            over.append(name)
    print(f"{'all notebooks':30} {total:6.1f} s")
    print(f"over the budget ({NOTEBOOK_BUDGET_S} s per notebook, {CELL_BUDGET_S} s per cell, on the 2-core machine): "
          f"{', '.join(over) if over else 'none'}")

