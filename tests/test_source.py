"""helpers.source: given code shown highlighted in a notebook, whole or the part the text discusses."""
import pytest

from helpers.source import show_source, source_lines


def _decorated(fn):
    return fn


@_decorated
def sample(x):
    """A docstring."""
    y = x + 1
    if y > 2:
        y *= 2
        return y
    return -y


def test_part_of_a_function_with_elisions_and_the_whole():
    assert source_lines(sample, "if y", "return y") == \
        "@_decorated\ndef sample(x):\n    ...\n    if y > 2:\n        y *= 2\n        return y\n    ..."
    assert source_lines(sample).splitlines()[:2] == ["@_decorated", "def sample(x):"]
    assert source_lines(sample).endswith("return -y")
    with pytest.raises(ValueError, match="no line contains 'while'"):
        source_lines(sample, "while")


def test_show_source_is_highlighted_html_and_the_plain_source():
    from IPython.core.formatters import DisplayFormatter
    data, _ = DisplayFormatter().format(show_source((sample, "y = x"), sample))
    assert set(data) == {"text/plain", "text/html"}
    assert data["text/plain"].startswith("@_decorated\ndef sample(x):\n    ...\n    y = x + 1")
    assert "\n\n@_decorated\ndef sample(x):" in data["text/plain"]
    assert "<span" in data["text/html"]
