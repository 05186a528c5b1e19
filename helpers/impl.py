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
    writes it, their code runs. Graders never fall back: they run under pytest, not in a kernel, and the
    grader makes solutions/ unimportable. COURSE_FALLBACK=0 turns the fallback off in a kernel too.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import pathlib
import sys

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
        exercises = ", ".join(sorted(set(used)))
        print(f"{exercises} not written yet in labs/{module.replace('.', '/')}.py: "
              f"this run uses the reference answer (solutions/).")
    return mod


def _is_rank_zero() -> bool:
    try:
        import torch.distributed as dist
        return not dist.is_initialized() or dist.get_rank() == 0
    except Exception:
        return True
