"""The check that every interactive view of a notebook works after Run All (tests/conftest.py runs it in the
kernel nbval used for the notebook's cells, after the last one): every control of every `interact` view is moved
through its values and the view's function called, as a slider move does; any exception is a failure.

Imported only in a kernel where ipywidgets is already imported (a notebook with widgets), so a notebook without
any pays nothing.
"""
from __future__ import annotations


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
    from ipywidgets.widgets import interaction
    from ipywidgets.widgets.widget import _instances

    shell = get_ipython()
    problems, raised = [], []
    drive_widgets.calls = 0

    def record(*args, **kwargs):        # interactive.update catches the error and shows it: keep it instead
        raised.append(sys.exc_info()[1])

    def draw_and_close(*args, **kwargs):
        """Draw every open figure (errors in drawing code surface here) and close it: no PNG is encoded
        and sent, which is most of a view's time."""
        for number in plt.get_fignums():
            figure = plt.figure(number)
            figure.canvas.draw()
            plt.close(figure)

    original = shell.showtraceback
    shell.showtraceback = record
    patched = [(plt, "show"), (interaction, "show_inline_matplotlib_plots")]
    saved = [getattr(owner, name) for owner, name in patched]
    for owner, name in patched:
        setattr(owner, name, draw_and_close)
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
                    control.value = default
            finally:
                for control in controls:
                    control.observe(view.update, names="value")
    finally:
        shell.showtraceback = original
        for (owner, name), value in zip(patched, saved):
            setattr(owner, name, value)
    return problems
