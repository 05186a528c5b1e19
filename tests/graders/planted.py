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

The tests themselves are the same in every grader file, so they are written once, here (`planted_tests`): a
grader binds them at module level,

    planted_results, test_planted_mistakes_are_caught, test_valid_alternatives_pass, \
        test_reference_passes_every_check = planted_tests("planted_ch09_routing", CHECKS, "solutions.kv_router")

and pytest collects them as that file's tests (same ids: test_planted_mistakes_are_caught[<mistake name>]). The
trust rule holds: every planted answer is built and checked in a launched rank (`planted_job`), never in the
process that records a grade; the test process only reads the failure messages back. `names` reads the
mistakes' names with ast, so collection imports no solution.
"""
from __future__ import annotations

import ast
import importlib
import pathlib
import re
from dataclasses import dataclass

import pytest

from helpers.grade import condense
from helpers.launch import launch

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
    check: str = ""             # which of the exercise's checks runs it ("a+b": in order); its module's build(name)
                                # builds the answer


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


# ------------------------------------------------------------------------- the planted tests of a grader file

def names(module: str, table: str) -> list:
    """The names in tests/graders/<module>.py's `table`, read with ast (collection imports no solution): a list
    of Mistake(exercise, name, ...) records, or a dict keyed by name (the older files' VARIANTS)."""
    tree = ast.parse((pathlib.Path(__file__).parent / f"{module}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == table:
            if isinstance(node.value, ast.Dict):
                return [k.value for k in node.value.keys]
            return [call.args[1].value for call in node.value.elts]
    return []


def record(planted, name: str, exercise: str = "", check: str = "") -> Mistake:
    """The Mistake named `name` in a planted module: from MISTAKES/ALTERNATIVES (lists of Mistake), or from the
    older VARIANTS/ALTERNATIVES dicts of Variant(exercise?, check or checks?, what, points_at?) or of what alone
    (`exercise`, `check`: for the records that carry none)."""
    for m in (*getattr(planted, "MISTAKES", ()), *getattr(planted, "ALTERNATIVES", ())):
        if isinstance(m, Mistake) and m.name == name:
            return m
    v = next(table[name] for table in (getattr(planted, "VARIANTS", {}), getattr(planted, "ALTERNATIVES", {}))
             if isinstance(table, dict) and name in table)
    if isinstance(v, str):
        return Mistake(exercise, name, v, (), check=check)
    check = "+".join(v.checks) if hasattr(v, "checks") else getattr(v, "check", check)
    points_at = mistake("", name, "", getattr(v, "points_at", ())).points_at
    return Mistake(getattr(v, "exercise", exercise), name, v.what, points_at, check=check)


def planted_job(rank, world_size, module, checks, names, ranked=False, check=""):
    """In a launched rank: each named planted answer through its record's checks ("a+b": in order, up to the
    first that fails, as the learner reads only the first failure; `check` for records that name none); None:
    the reference through every check. A check that raises is a failure naming the exception; NotImplementedError
    (an answer left a stub) is raised. ranked: the checks take (impl, rank, world_size, group, label), run in
    the world group."""
    planted = importlib.import_module(f"tests.graders.{module}")
    out = {}
    for name in names:
        impl = planted.build(name)
        failures = []
        for c in (checks if name is None else record(planted, name, check=check).check.split("+")):
            try:
                failures += checks[c](impl, rank, world_size, None, "WORLD") if ranked else checks[c](impl)
            except NotImplementedError:
                raise
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
            if failures and name is not None:
                break
        out[name] = failures
    return out


def grouped_job(rank, world_size, checks, names, impl=None):
    """In a launched rank: the named ranked checks of a grader's `checks` (check(impl, rank, world_size, group,
    label) -> failures) in the world group and, at 4 ranks, in the sub-groups {0,1} and {2,3} as well (every rank
    creates both groups, as dist.new_group requires)."""
    import torch.distributed as dist
    groups = [(None, "WORLD")]
    if world_size == 4:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        groups.append((pairs[rank // 2], f"group {[0, 1] if rank < 2 else [2, 3]}"))
    return [f for name in names for group, label in groups for f in checks[name](impl, rank, world_size, group, label)]


def assert_no_failures(results) -> None:
    """`launch`'s results (a list of failures per rank) hold none; else the first 8 are the message."""
    failures = [f for rank_failures in results for f in rank_failures]
    assert not failures, "\n".join(failures[:8])


def run_planted(module, checks, names, *, world_size=1, ranked=False, timeout=120, check="") -> dict:
    """name -> the failures of every rank (rank order) for these planted answers, checked in launched jobs:
    one, or one per world size where `world_size` maps a record's (first) check to its own."""
    planted = importlib.import_module(f"tests.graders.{module}")

    def size(name):
        if not isinstance(world_size, dict):
            return world_size
        return world_size[record(planted, name, check=check).check.split("+")[0]]
    out = {}
    for n in sorted({size(name) for name in names}):
        group = [name for name in names if size(name) == n]
        by_rank = launch(planted_job, n, module, checks, group, ranked, check, show_output=False, timeout=timeout)
        out.update({name: [f for rank_out in by_rank for f in rank_out[name]] for name in group})
    return out


def planted_tests(module: str, checks: dict, needs: str, *, world_size=1, ranked: bool = False,
                  timeout: float = 120, own: dict | None = None, alternatives: str = "each",
                  reference=True, exercise: str = "", check: str = ""):
    """The planted tests of a grader file: (planted_results, test_planted_mistakes_are_caught,
    test_valid_alternatives_pass, test_reference_passes_every_check), to bind at module level under those names
    (a file may bind one under its older name: pytest names a test by the name it is bound to).

    module: the planted file (tests/graders/<module>.py: MISTAKES and ALTERNATIVES, or VARIANTS; build(name)).
    checks: the grader's CHECKS (name -> check(impl) -> failures; ranked: check(impl, rank, world_size, group,
        label)). needs: the reference module (the tests skip without it: instructor grading of a submission).
    world_size, ranked, timeout: the launched job that checks every planted answer; world_size: a number, or
        check name -> world size (one job per size).
    own: check name -> fn(name) -> failures, for answers whose check the grader runs itself (another job).
    alternatives: "each" (one test per valid alternative), "one" (one test for all of them: the older files'
        id), or None (the grader tests them its own way; the fixture leaves them out).
    reference: True (the reference through every check), a list of check names, or False (no such test).
    exercise, check: for older records that carry none.
    """
    own = own or {}
    caught_names = names(module, "VARIANTS") or names(module, "MISTAKES")
    valid_names = names(module, "ALTERNATIVES") if alternatives else []

    def load():
        return importlib.import_module(f"tests.graders.{module}")

    def results(planted_results, name):
        m = record(load(), name, exercise, check)
        return (own[m.check](name) if m.check in own else planted_results[name]), m

    @pytest.fixture(scope="module", name="planted_results")
    def planted_results():
        pytest.importorskip(needs, reason="the reference answers are absent (instructor grading)")
        planted = load()
        launched = [n for n in caught_names + valid_names if record(planted, n, exercise, check).check not in own]
        return run_planted(module, checks, launched, world_size=world_size, ranked=ranked, timeout=timeout,
                           check=check)

    @pytest.mark.parametrize("name", caught_names)
    def test_planted_mistakes_are_caught(planted_results, name):
        failures, m = results(planted_results, name)
        assert_caught(m, failures)

    @pytest.mark.parametrize("name", valid_names)
    def test_valid_alternatives_pass(planted_results, name):
        failures, m = results(planted_results, name)
        assert_passes(name, m.what, failures)

    def test_valid_alternatives_pass_together(planted_results):
        """Answers written differently pass the same checks: the graders grade the mechanism, not one way of
        writing it."""
        for name in valid_names:
            failures, m = results(planted_results, name)
            assert_passes(name, m.what, failures)

    def test_reference_passes_every_check():
        pytest.importorskip(needs, reason="the reference answers are absent")
        run = list(checks) if reference is True else list(reference)
        sizes = {world_size.get(c) for c in run} if isinstance(world_size, dict) else {world_size}
        failures = []
        for n in sorted(sizes):            # each check at its own world size
            subset = {c: checks[c] for c in run if not isinstance(world_size, dict) or world_size[c] == n}
            failures += run_planted(module, subset, [None], world_size=n, ranked=ranked, timeout=timeout)[None]
        assert not failures, "\n".join(failures[:6])

    if alternatives == "one":
        test_valid_alternatives_pass = test_valid_alternatives_pass_together
        test_valid_alternatives_pass.__name__ = test_valid_alternatives_pass.__qualname__ = \
            "test_valid_alternatives_pass"
    return (planted_results, test_planted_mistakes_are_caught, test_valid_alternatives_pass if alternatives else None,
            test_reference_passes_every_check if reference else None)
