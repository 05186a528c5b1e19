"""Show given code in a notebook: highlighted, and only the part the text discusses.

    show_source(Engine.step)                                    # the whole method
    show_source((Engine._admit, "while self.waiting", "return"))  # its lines from one line to another

What is shown is read from the running code (`inspect.getsource`), so it cannot drift from what runs. The cell's
output is IPython's `Code` display: highlighted in JupyterLab, its plain text (what nbval compares) the source.
"""
from __future__ import annotations

import inspect
import textwrap

from IPython.display import Code


class _Source(Code):
    _repr_latex_ = None          # highlighted HTML and plain text only: no LaTeX copy stored in the notebook


def source_lines(obj, start: str | None = None, end: str | None = None) -> str:
    """The dedented source of obj; with `start`, from the first line containing it, to the first line from there
    containing `end` (inclusive), with `...` where lines were left out. A marker that is not found raises
    ValueError (the code changed: update the cell)."""
    lines = textwrap.dedent(inspect.getsource(obj)).rstrip("\n").splitlines()
    if start is None:
        return "\n".join(lines)
    first = next((i for i, line in enumerate(lines) if start in line), None)
    if first is None:
        raise ValueError(f"{obj.__qualname__}: no line contains {start!r}")
    last = len(lines) - 1 if end is None else next((i for i in range(first, len(lines)) if end in lines[i]), None)
    if last is None:
        raise ValueError(f"{obj.__qualname__}: no line from {start!r} on contains {end!r}")
    indent = len(lines[first]) - len(lines[first].lstrip())
    # the signature stays (after any decorators), then `...` for what is left out before `start`
    head = next((i for i, line in enumerate(lines) if line.lstrip().startswith(("def ", "async def ", "class "))), 0)
    if first <= head:
        shown = lines[first:last + 1]
    else:
        shown = lines[:head + 1] + ([" " * indent + "..."] if first > head + 1 else []) + lines[first:last + 1]
    if last < len(lines) - 1:
        shown.append(" " * indent + "...")
    return "\n".join(shown)


def show_source(*parts) -> Code:
    """Highlighted source of each part: a function, method or class, or (obj, start, end) for part of one
    (see source_lines); parts are separated by a blank line."""
    texts = [source_lines(*part) if isinstance(part, tuple) else source_lines(part) for part in parts]
    return _Source("\n\n".join(texts), language="python")
