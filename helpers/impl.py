"""Which implementation of the exercises runs: the learner's `labs` (default) or the reference `solutions`.

Notebooks and graders never import `labs.x` or `solutions.x` directly; they call `load_impl("x")`, and the
environment variable COURSE_IMPL picks the package. CI sets COURSE_IMPL=solutions, so the stored notebook
outputs show what a finished exercise prints; a learner's kernel runs their own labs/ code.

Two things make the learner's path smooth in a notebook (and only there):
  * An edit in labs/ takes effect the next time a cell runs: `load_impl` re-imports a module whose file
    changed since it was imported, without a kernel restart.
  * An exercise not written yet does not stop the chapter. In a Jupyter kernel, a labs/ function or class
    whose code still raises `NotImplementedError("Exercise N.M: ...")` is replaced by the reference answer
    from solutions/, and rank 0 prints one line saying so (which exercise, which file). Once the learner
    writes it, their code runs. The processes a notebook starts (chapter 6's server, torchrun workers) fall
    back too: the kernel sets COURSE_FALLBACK=1 in its environment, which they inherit. Graders never fall
    back: they run under pytest with COURSE_FALLBACK=0, and the grader makes solutions/ unimportable.
    COURSE_FALLBACK=0 turns the fallback off in a kernel too.

A fallback is never silent. In the kernel the line is printed at once. A process the kernel started (a
launched rank whose output the cell does not show, a server replica, a torchrun worker) cannot print into
the cell, so it appends its line to a notes file the kernel named in COURSE_FALLBACK_NOTES, and the kernel
prints its new lines before the cell's value (`Out[n]`) and at the end of the cell that was running. A cell
prints one line per file, however often it (or given code it calls, or its ranks) loads the module.

A class runs whole: while any of its exercise methods still raises the stub, the reference class runs in its
place, and the line names the methods still missing (a learner who wrote `allocate` sees why it did not run).
"""
from __future__ import annotations

import ast
import atexit
import importlib
import importlib.util
import os
import pathlib
import sys
import tempfile

DEFAULT = "labs"
REFERENCE = "solutions"


def impl_package() -> str:
    return os.environ.get("COURSE_IMPL", DEFAULT)


def load_impl(module: str):
    """Import `<COURSE_IMPL>.<module>`, e.g. load_impl("ring_collectives") -> labs.ring_collectives."""
    package = impl_package()
    try:
        mod = _import_fresh(f"{package}.{module}")
    except ModuleNotFoundError as exc:
        if exc.name in (package, f"{package}.{module}"):
            raise ModuleNotFoundError(
                f"COURSE_IMPL={package!r} has no module {module!r}: set COURSE_IMPL to 'labs' or "
                f"'solutions' (or a package of your own with the same module names)") from None
        raise
    if package != DEFAULT or not _fallback_enabled():
        return mod
    return _with_reference_for_stubs(mod, module)


def _fallback_enabled() -> bool:
    setting = os.environ.get("COURSE_FALLBACK")
    if setting is not None:
        return setting not in ("0", "", "false", "no")
    return "ipykernel" in sys.modules          # a notebook kernel (and the ranks it forks), never pytest


def announce(line: str) -> None:
    """Say that a reference answer runs in place of an unwritten exercise, where the learner sees it: printed
    in the kernel (or any process the kernel did not start), otherwise appended to the kernel's notes file."""
    notes = os.environ.get("COURSE_FALLBACK_NOTES")
    if not notes or os.environ.get("COURSE_FALLBACK_KERNEL") == str(os.getpid()):
        _show_once(line)
        return
    try:
        with open(notes, "a") as f:           # one short append: atomic with O_APPEND
            f.write(line + "\n")
    except OSError:
        print(line, flush=True)


_SHOWN_THIS_CELL: set[str] = set()    # fallback lines printed during the cell that is running


def _show_once(line: str) -> None:
    """Print a fallback line unless the running cell already printed it: one line per file per cell, however
    often the cell (or given code it calls) loads the module, and whichever process reported it."""
    if line in _SHOWN_THIS_CELL:
        return
    _SHOWN_THIS_CELL.add(line)
    print(line, flush=True)


class _NotesFirst:
    """The kernel's displayhook (what shows a cell's trailing value as `Out[n]`), preceded by the fallback
    lines that arrived so far: they belong above the cell's value, not under it."""

    def __init__(self, hook, show_new_notes):
        self.hook, self.show_new_notes = hook, show_new_notes

    def __call__(self, value):
        if value is not None:
            self.show_new_notes()
        return self.hook(value)


def _watch_notes_in_kernel() -> None:
    """In a notebook kernel: export the fallback to the processes it starts (`python -m
    helpers.course.serving`, torchrun's workers are no kernel, but still the learner's Run All), name the notes
    file they write to, and print its new lines before the cell's value and at the end of each cell."""
    try:
        from IPython import get_ipython
        shell = get_ipython()
    except ImportError:
        return
    if shell is None or "COURSE_FALLBACK_NOTES" in os.environ:
        return
    os.environ.setdefault("COURSE_FALLBACK", "1")
    fd, path = tempfile.mkstemp(prefix="course-fallback-", suffix=".txt")
    os.close(fd)
    os.environ["COURSE_FALLBACK_NOTES"], os.environ["COURSE_FALLBACK_KERNEL"] = path, str(os.getpid())
    read = {"offset": 0}

    def show_new_notes(*_):
        try:
            with open(path) as f:
                f.seek(read["offset"])
                text = f.read()
                read["offset"] = f.tell()
        except OSError:
            return
        for line in text.splitlines():
            if line:
                _show_once(line)

    def new_cell(*_):
        show_new_notes()                      # what a background process wrote between cells: shown, then
        _SHOWN_THIS_CELL.clear()              # a new cell may say it again (once)

    shell.events.register("pre_run_cell", new_cell)
    shell.events.register("post_run_cell", show_new_notes)
    trap = getattr(shell, "display_trap", None)
    if trap is not None and not isinstance(trap.hook, _NotesFirst):
        trap.hook = _NotesFirst(trap.hook, show_new_notes)
    atexit.register(lambda: os.path.exists(path) and os.remove(path))


if "ipykernel" in sys.modules:
    _watch_notes_in_kernel()


def _import_fresh(name: str):
    """Import `name`, or re-import it if its source file changed since it was imported."""
    mod = sys.modules.get(name)
    if mod is None:
        mod = importlib.import_module(name)
    else:
        path = getattr(mod, "__file__", None)
        if path and os.path.exists(path) and os.stat(path).st_mtime_ns != getattr(mod, "__course_mtime__", None):
            cached = importlib.util.cache_from_source(path)
            if os.path.exists(cached):        # the .pyc is keyed by mtime in whole seconds: never reuse it here
                os.remove(cached)
            mod = importlib.reload(mod)
    if getattr(mod, "__file__", None):
        mod.__course_mtime__ = os.stat(mod.__file__).st_mtime_ns
    return mod


def unwritten_exercises(path) -> dict[str, str]:
    """Top-level functions and classes of a file whose code still raises NotImplementedError("Exercise ..."):
    {name: the stub's message}."""
    found = {}
    for node in ast.parse(pathlib.Path(path).read_text()).body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, ast.Raise) and isinstance(sub.exc, ast.Call) and \
                    getattr(sub.exc.func, "id", None) == "NotImplementedError" and sub.exc.args and \
                    isinstance(sub.exc.args[0], ast.Constant) and str(sub.exc.args[0].value).startswith("Exercise"):
                found[node.name] = str(sub.exc.args[0].value)
                break
    return found


def _with_reference_for_stubs(mod, module: str):
    stubs = unwritten_exercises(mod.__file__) if getattr(mod, "__file__", None) else {}
    if not stubs:
        return mod
    try:
        reference = importlib.import_module(f"{REFERENCE}.{module}")
    except ImportError:
        return mod                              # no reference here: the stub raises its own clear error
    # Patched into the module itself, so given code in the same file (which looks the names up in its module)
    # uses the reference too. An edit of the file re-imports it from source (_import_fresh).
    used = []
    for name, message in stubs.items():
        if hasattr(reference, name):
            setattr(mod, name, getattr(reference, name))
            used.append(message.split(":")[0])
    if used and _is_rank_zero():
        announce(fallback_line(module, sorted(set(used)), partly_written_classes(mod.__file__, reference.__file__)))
    return mod


def fallback_line(module: str, exercises: list[str], partly: dict[str, tuple[list[str], list[str]]]) -> str:
    """The one line a fallback prints. A class runs whole or not at all: where the learner wrote some of its
    methods, the line names the methods still missing (their own ones wait for those)."""
    detail = "; ".join(f"{cls}: {', '.join(missing)} still missing, so your {', '.join(written)} "
                       f"{'waits' if len(written) == 1 else 'wait'} too" for cls, (missing, written) in partly.items())
    return (f"{', '.join(exercises)} not written yet in labs/{module.replace('.', '/')}.py"
            + (f" ({detail})" if detail else "") + ": this run uses the reference answer (solutions/).")


def _methods(path) -> dict[str, dict[str, ast.AST]]:
    tree = ast.parse(pathlib.Path(path).read_text())
    return {node.name: {m.name: m for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))}
            for node in tree.body if isinstance(node, ast.ClassDef)}


def _raises_stub(node) -> bool:
    return any(isinstance(sub, ast.Raise) and isinstance(sub.exc, ast.Call) and
               getattr(sub.exc.func, "id", None) == "NotImplementedError" and sub.exc.args and
               isinstance(sub.exc.args[0], ast.Constant) and str(sub.exc.args[0].value).startswith("Exercise")
               for sub in ast.walk(node))


def partly_written_classes(lab_path, reference_path) -> dict[str, tuple[list[str], list[str]]]:
    """Classes of a lab file with some exercise methods written and some still stubs:
    {class: ([methods still raising the stub], [methods the learner wrote])}. A written method is one that
    no longer raises the stub and differs from the reference file's (given methods are the same in both)."""
    try:
        lab, ref = _methods(lab_path), _methods(reference_path)
    except (OSError, SyntaxError, ValueError):
        return {}
    found = {}
    for cls, methods in lab.items():
        missing = [name for name, node in methods.items() if _raises_stub(node)]
        given = ref.get(cls, {})
        written = [name for name, node in methods.items() if name not in missing and name in given
                   and ast.dump(node) != ast.dump(given[name])]
        if missing and written:
            found[cls] = (missing, written)
    return found


def _is_rank_zero() -> bool:
    try:
        import torch.distributed as dist
        return not dist.is_initialized() or dist.get_rank() == 0
    except Exception:
        return True
