"""The planted-mistakes harness that every grader file's `test_planted_*` goes through (issue 21 item 19).

A planted mistake is a realistic wrong answer (in tests/graders/planted_chNN*.py) that its exercise's own
checks must catch, with a message that points at the bug. The learner never reads a grader's raw failure:
helpers/grade.py shows one line of it (grade.condense: the first line, a hung job's stacks as one line, cut
to grade's limit). So the harness judges that line, not the raw text, and one formatter says what went wrong:

    assert_caught(mistake, failures)     failures: the checks' messages, the first being what the grade shows
    assert_passes(name, what, failures)  a valid answer written differently: no failure at all

A message the learner reads also must not be useless whatever it matches: a bare IndexError/KeyError from the
grader's own indexing, "the a collective", a line that announces something (ends with ':') and stops there.

One record format, `Mistake`, for new planted mistakes; the older files keep their own records (five formats,
listed in the issue) and pass their fields to assert_caught through `mistake(...)`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from helpers.grade import condense

# Messages that explain nothing: (pattern, what is wrong with them).
USELESS = [
    (re.compile(r"^(?:rank \d+ raised )?(?:IndexError|KeyError): (?:list |tuple )?(?:index out of range|-?\d+)$"),
     "a bare IndexError/KeyError: the grader indexed the answer without checking its length or keys"),
    (re.compile(r"\bthe an? \b"), "'the a ...': a phrase built from a fallback"),
    (re.compile(r":\s*$"), "a line that announces what follows and stops"),
    (re.compile(r"Where each rank was stuck: no stack"), "a hang without where each rank was stuck"),
]


@dataclass(frozen=True)
class Mistake:
    """One planted mistake. points_at: regexes, one of which the line the learner reads must match."""
    exercise: str
    name: str
    what: str
    points_at: tuple
    answer: object = None                           # the wrong answer, or what builds it (each grader knows)
    check: str = ""                                 # which of the exercise's checks runs it
    options: dict = field(default_factory=dict)     # anything else the grader's runner needs


def mistake(exercise: str, name: str, what: str, points_at) -> Mistake:
    """A Mistake from an older record's fields; points_at: a regex or a tuple of plain fragments."""
    if isinstance(points_at, str):
        return Mistake(exercise, name, what, (points_at,))
    return Mistake(exercise, name, what, tuple(re.escape(p) for p in points_at))


def learner_reads(failures) -> str:
    """The line the grade table shows for these failures (a message, or a list whose first one counts)."""
    if isinstance(failures, BaseException):
        failures = str(failures)
    if not isinstance(failures, str):
        failures = next((str(f) for f in failures if str(f).strip()), "")
    return condense(failures) if failures.strip() else ""


def useless(line: str) -> str:
    """'' or why this line tells the learner nothing."""
    return next((why for pattern, why in USELESS if pattern.search(line)), "")


def assert_caught(m: Mistake, failures) -> str:
    """The mistake was caught, and the line the learner reads points at it. Returns that line."""
    line = learner_reads(failures)
    label = f"planted mistake {m.name!r} ({m.what}), exercise {m.exercise}"
    if not line:
        raise AssertionError(f"{label}: the grader let it pass")
    bad = useless(line)
    if bad:
        raise AssertionError(f"{label}: caught, but the learner reads {bad}: {line}")
    if not any(re.search(p, line) for p in m.points_at):
        raise AssertionError(f"{label}: caught, but the line the learner reads does not point at it (expected "
                             f"/{'/ or /'.join(m.points_at)}/): {line}")
    return line


def assert_passes(name: str, what: str, failures) -> None:
    """A valid answer, written differently from the reference: its exercise's checks say nothing."""
    line = learner_reads(failures)
    if line:
        raise AssertionError(f"valid answer {name!r} ({what}) was failed: {line}")
