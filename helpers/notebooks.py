"""Execute chapter notebooks top to bottom and store their outputs (what nbval later compares).

    python -m helpers.notebooks notebooks/00_processes_and_ranks.ipynb   # one
    python -m helpers.notebooks                                          # all of them

Runs with COURSE_IMPL=solutions, like CI, in a fresh kernel from this environment, so the stored outputs
are exactly what a fresh "Restart and Run All" prints with finished exercises.
"""
import os
import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parent.parent


def execute(path: pathlib.Path, timeout: int = 600) -> float:
    os.environ["COURSE_IMPL"] = "solutions"
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
                   ).execute()
    nb.metadata.pop("widgets", None)  # widget state is random model ids: not worth storing
    nbformat.write(nb, path)
    return time.perf_counter() - start


def main(argv=None):
    args = (argv if argv is not None else sys.argv[1:]) or sorted(str(p) for p in (ROOT / "notebooks").glob("*.ipynb"))
    for name in args:
        seconds = execute(pathlib.Path(name).resolve())
        print(f"{name}: executed in {seconds:.1f} s")


if __name__ == "__main__":
    main()
