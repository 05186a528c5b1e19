"""Which implementation of the exercises runs: the learner's `labs` (default) or the reference `solutions`.

Notebooks and graders never import `labs.x` or `solutions.x` directly; they call `load_impl("x")`, and the
environment variable COURSE_IMPL picks the package. CI sets COURSE_IMPL=solutions, so the stored notebook
outputs show what a finished exercise prints; a learner's kernel runs their own labs/ code.
"""
import importlib
import os

DEFAULT = "labs"


def impl_package() -> str:
    return os.environ.get("COURSE_IMPL", DEFAULT)


def load_impl(module: str):
    """Import `<COURSE_IMPL>.<module>`, e.g. load_impl("ring_collectives") -> labs.ring_collectives."""
    package = impl_package()
    try:
        return importlib.import_module(f"{package}.{module}")
    except ModuleNotFoundError as exc:
        if exc.name in (package, f"{package}.{module}"):
            raise ModuleNotFoundError(
                f"COURSE_IMPL={package!r} has no module {module!r}: set COURSE_IMPL to 'labs' or "
                f"'solutions' (or a package of your own with the same module names)") from None
        raise
