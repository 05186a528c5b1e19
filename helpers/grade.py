"""Grade the exercises: `make grade`, or `python -m helpers.grade [CHAPTER] [--impl labs] [--json FILE]`.

Every grader test (in tests/test_chNN_*.py) carries `@pytest.mark.exercise("1.2", "Ring all-gather")`. This module runs
those tests with pytest (in a subprocess, against COURSE_IMPL=labs unless told otherwise), sorts each
exercise into passed / failed / not started, prints a table and a score, and exits non-zero unless every
graded exercise passed.

A stub raises `NotImplementedError("Exercise 1.2: ...")`; when that error reaches the test (directly, or
from inside a rank via RankFailed) the exercise is "not started". A learner's code that hangs or kills a
worker fails only its own exercise: the launcher's timeout and pytest-timeout stop it, the rest are graded.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PASSED, FAILED, NOT_STARTED = "passed", "failed", "not started"


# ------------------------------------------------------------------ pytest plugin (runs inside pytest)

def _is_stub_error(excinfo) -> bool:
    from helpers.launch import RankFailed
    exc = excinfo.value
    if isinstance(exc, NotImplementedError):
        return True
    return isinstance(exc, RankFailed) and exc.exc_type == "NotImplementedError"


def _reason(excinfo) -> str:
    """The first useful line of a failure: the assertion message, or which rank failed and why."""
    from helpers.launch import JobTimeout, RankFailed
    exc = excinfo.value
    if isinstance(exc, RankFailed):
        text = f"rank {exc.rank} " + (f"raised {exc.exc_type}: {exc.message}" if exc.exc_type else exc.message)
    elif isinstance(exc, JobTimeout):
        text = f"hung: the job did not finish within {exc.timeout:g} s (ranks waiting on each other?)"
    elif excinfo.typename == "Failed" and "Timeout" in str(exc):
        text = "timed out (pytest-timeout): the exercise never returned"
    else:
        text = f"{excinfo.typename}: {exc}" if not isinstance(exc, AssertionError) else str(exc) or "assertion failed"
    first = text.strip().splitlines()[0] if text.strip() else excinfo.typename
    return first[:300]


class GradePlugin:
    def __init__(self, report_path: str, chapter: str | None):
        self.report_path, self.chapter, self.rows = report_path, chapter, []

    @pytest.hookimpl
    def pytest_collection_modifyitems(self, config, items):
        keep, drop = [], []
        for item in items:
            mark = item.get_closest_marker("exercise")
            ok = mark is not None and (self.chapter is None or str(mark.args[0]).split(".")[0] == self.chapter)
            (keep if ok else drop).append(item)
        items[:] = keep
        config.hook.pytest_deselected(items=drop)

    @pytest.hookimpl
    def pytest_runtest_setup(self, item):
        # The first failing test decides an exercise: skip the rest (a hanging stub costs one timeout, not ten).
        mark = item.get_closest_marker("exercise")
        if mark is not None and any(r["exercise"] == str(mark.args[0]) and r["status"] != PASSED for r in self.rows):
            pytest.skip(f"exercise {mark.args[0]} already failed")

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = yield
        mark = item.get_closest_marker("exercise")
        if mark is None or not (report.when == "call" or report.failed or report.skipped):
            return report
        if report.when != "call" and report.passed:
            return report
        exercise, title = str(mark.args[0]), (mark.args[1] if len(mark.args) > 1 else "")
        if report.passed:
            status, reason = PASSED, ""
        elif report.skipped:
            return report
        elif call.excinfo is not None and _is_stub_error(call.excinfo):
            status, reason = NOT_STARTED, _reason(call.excinfo)
        else:
            status = FAILED
            reason = _reason(call.excinfo) if call.excinfo is not None else str(report.longrepr)[:300]
        self.rows.append({"exercise": exercise, "title": title, "test": item.nodeid,
                          "status": status, "reason": reason})
        return report

    def pytest_sessionfinish(self, session):
        with open(self.report_path, "w") as f:
            json.dump(self.rows, f)


def pytest_addoption(parser):
    parser.addoption("--grade-report", default=None, help="write per-test grading rows (JSON) here")
    parser.addoption("--grade-chapter", default=None, help="grade only this chapter's exercises")


def pytest_configure(config):
    path = config.getoption("--grade-report")
    if path:
        config.pluginmanager.register(GradePlugin(path, config.getoption("--grade-chapter")), "grade-plugin")


# -------------------------------------------------------------------------------- the command line

def summarize(rows: list[dict]) -> list[dict]:
    """One row per exercise: passed if all its tests passed, not started if any test hit the stub."""
    by_exercise: dict[str, dict] = {}
    for row in rows:
        ex = by_exercise.setdefault(row["exercise"], {"exercise": row["exercise"], "title": row["title"],
                                                      "tests": 0, "passed": 0, "status": PASSED, "reason": ""})
        ex["tests"] += 1
        ex["passed"] += row["status"] == PASSED
        if row["status"] == NOT_STARTED:
            if ex["status"] != NOT_STARTED:
                ex["status"], ex["reason"] = NOT_STARTED, row["reason"]
        elif row["status"] == FAILED and ex["status"] == PASSED:
            ex["status"], ex["reason"] = FAILED, f"{row['test'].split('::')[-1]}: {row['reason']}"

    def key(ex_id):
        return tuple(int(p) if p.isdigit() else p for p in ex_id.split("."))
    return [by_exercise[k] for k in sorted(by_exercise, key=key)]


def run(chapter: str | None = None, impl: str = "labs", timeout: int = 180, quiet: bool = True) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "rows.json")
        env = dict(os.environ, COURSE_IMPL=impl, PYTHONDONTWRITEBYTECODE="1")
        # Graders live in tests/test_chNN_*.py; collecting only those keeps a grading run light.
        pattern = f"test_ch{int(chapter):02d}_*.py" if chapter is not None else "test_ch*.py"
        files = sorted(str(p) for p in (ROOT / "tests").glob(pattern))
        if not files:
            return []
        cmd = [sys.executable, "-m", "pytest", *files, "-p", "helpers.grade",
               f"--grade-report={report}", f"--timeout={timeout}", "-q", "-rN", "--no-header", "-p", "no:warnings"]
        if chapter is not None:
            cmd.append(f"--grade-chapter={chapter}")
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL if quiet else None,
                       stderr=subprocess.DEVNULL if quiet else None, stdin=subprocess.DEVNULL)
        if not os.path.exists(report):
            raise SystemExit("the graders did not run (pytest could not start); run "
                             f"`COURSE_IMPL={impl} python -m pytest tests -m exercise` to see why")
        with open(report) as f:
            return summarize(json.load(f))


def render(exercises: list[dict]) -> str:
    mark = {PASSED: "PASS", FAILED: "FAIL", NOT_STARTED: "TODO"}
    width = max([len(e["title"]) for e in exercises] + [10])
    lines = [f"{'':4}  {'exercise':<8} {'title':<{width}}  {'tests':>7}  status"]
    for e in exercises:
        lines.append(f"{mark[e['status']]:4}  {e['exercise']:<8} {e['title']:<{width}}  "
                     f"{e['passed']:>3}/{e['tests']:<3}  {e['status']}")
        if e["reason"]:
            lines.append(f"{'':14}↳ {e['reason']}")
    done = sum(e["status"] == PASSED for e in exercises)
    lines.append(f"\nscore: {done}/{len(exercises)} exercises passed")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.grade", description=__doc__.split("\n\n")[0])
    parser.add_argument("chapter", nargs="?", help="grade only this chapter, e.g. 1")
    parser.add_argument("--impl", default=os.environ.get("GRADE_IMPL", "labs"),
                        help="package to grade: labs (yours, default) or solutions (the reference)")
    parser.add_argument("--json", metavar="FILE", help="also write a machine-readable report here")
    parser.add_argument("--markdown", metavar="FILE", help="append a Markdown summary here (e.g. $GITHUB_STEP_SUMMARY)")
    parser.add_argument("--timeout", type=int, default=180, help="seconds before one grader test is failed")
    parser.add_argument("--verbose", action="store_true", help="show pytest's own output")
    args = parser.parse_args(argv)
    exercises = run(args.chapter, args.impl, args.timeout, quiet=not args.verbose)
    if not exercises:
        print(f"no exercises found{' in chapter ' + args.chapter if args.chapter else ''}")
        return 2
    print(render(exercises))
    if args.json:
        done = sum(e["status"] == PASSED for e in exercises)
        with open(args.json, "w") as f:
            json.dump({"impl": args.impl, "score": done, "total": len(exercises), "exercises": exercises}, f, indent=2)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(markdown(exercises))
    return 0 if all(e["status"] == PASSED for e in exercises) else 1


def markdown(exercises: list[dict]) -> str:
    done = sum(e["status"] == PASSED for e in exercises)
    icon = {PASSED: "✅", FAILED: "❌", NOT_STARTED: "⬜"}
    rows = [f"## Score: {done}/{len(exercises)} exercises passed\n", "| | exercise | title | status | reason |",
            "| --- | --- | --- | --- | --- |"]
    for e in exercises:
        reason = e["reason"].replace("|", "\\|")
        rows.append(f"| {icon[e['status']]} | {e['exercise']} | {e['title']} | {e['status']} | {reason} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
