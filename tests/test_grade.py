"""The grader sorts exercises into passed / failed / not started, survives hangs and crashes, and records a grade
no learner code can take down or forge: learner code never runs in the recording process, a dead test process
fails only its exercise, every process a grading run started is gone at the end, and the reference answers do
not count as an answer. The hostile and careless lab modules are in tests/fixtures/."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from helpers import grade


def by_id(exercises):
    return {e["exercise"]: e for e in exercises}


def _alive(pid, env_entry: str):
    """Whether process `pid` still runs and is the one we mean (its environment holds env_entry: the machine
    is busy, and a pid can be reused)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            running = f.read().rsplit(")", 1)[1].split()[0] != "Z"
        with open(f"/proc/{pid}/environ", "rb") as f:
            return running and env_entry.encode() in f.read()
    except OSError:
        return False


# --------------------------------------------------------------------------------- outcomes and messages

def test_wrong_answers_fail_with_the_assertion_message():
    result = by_id(grade.run("0", impl="tests.fixtures.broken"))
    # The reason names the case (test and parameters) and what the grader found, on which rank.
    assert result["0.1"]["status"] == "failed"
    assert re.match(r"test_sum_of_ranks\[\d\]: world_size=\d, rank 0", result["0.1"]["reason"]), result["0.1"]
    assert result["0.2"]["status"] == "failed" and "rank 0" in result["0.2"]["reason"]


def test_a_crashing_worker_fails_only_its_exercise():
    result = by_id(grade.run("0", impl="tests.fixtures.crashing"))
    assert result["0.1"]["status"] == "failed" and "exited with code 3" in result["0.1"]["reason"]
    assert result["0.2"]["status"] == "passed"


def test_a_hanging_exercise_fails_only_itself(monkeypatch):
    monkeypatch.setenv("COURSE_TIMEOUT", "2")
    result = by_id(grade.run("0", impl="tests.fixtures.hanging"))
    assert result["0.1"]["status"] == "failed" and "hung" in result["0.1"]["reason"]
    assert "within 2 s" in result["0.1"]["reason"]
    assert result["0.2"]["status"] == "passed"


def test_stubs_are_not_started_and_name_the_exercise_exit_status_and_json(tmp_path, capsys):
    report = tmp_path / "grade.json"
    assert grade.main(["0", "--impl", "labs", "--json", str(report)]) == 1
    table = capsys.readouterr().out
    assert "TODO  0.1" in table
    assert table.rstrip().splitlines()[-1] == "score: 0/2 exercises passed; 2 exercises left"
    data = json.loads(report.read_text())
    assert (data["score"], data["total"]) == (0, 2)
    result = by_id(data["exercises"])
    for ex in ("0.1", "0.2"):
        assert result[ex]["status"] == "not started"
        assert f"Exercise {ex}" in result[ex]["reason"]


def test_reference_solutions_pass_and_exit_zero(tmp_path):
    report = tmp_path / "grade.json"
    assert grade.main(["0", "--impl", "solutions", "--json", str(report)]) == 0
    result = by_id(json.loads(report.read_text())["exercises"])
    assert {k: v["status"] for k, v in result.items()} == {"0.1": "passed", "0.2": "passed"}


def test_a_long_message_keeps_the_case_and_both_values():
    """A reason used to be cut at 300 characters, before the part that differs."""
    expected, got = list(range(200)), list(range(199)) + [-1]
    message = f"world_size=4, shape=(200,): rank 3 expected {expected}, got {got}; look at the last chunk"
    short = grade.shorten(message, 400)
    assert len(short) <= 400
    assert short.startswith("world_size=4, shape=(200,): rank 3 expected [0, 1, 2")
    assert "198, -1]" in short and short.endswith("look at the last chunk")


def test_the_line_shown_keeps_where_a_hung_job_was_stuck_and_what_a_colon_announces():
    """Issue 21 item 19: a hang's reason used to end at "Where each rank was stuck:" (only the first line of a
    message was kept); a message announcing a list ("...:") lost the list."""
    from helpers.launch import JobTimeout
    stacks = {0: '  File "labs/warmup.py", line 6, in ring_pass\n  File "distributed_c10d.py", line 2799, in recv\n'
                 '    work.wait()',
              1: '  File "labs/warmup.py", line 5, in ring_pass\n  File "distributed_c10d.py", line 2750, in send\n'
                 '    work.wait()'}
    line = grade.condense("rank 0 raised AssertionError: " + str(JobTimeout(3, stacks, ["", ""])))
    assert line.endswith("Where each rank was stuck: rank 0 in recv (from ring_pass line 6); rank 1 in send (from "
                         "ring_pass line 5)"), line
    assert grade.condense("these blocks are held twice:\n  3\n  5") == "these blocks are held twice: 3 / 5"
    assert grade.where_stuck({}) == ""


def test_the_planted_mistakes_harness_judges_the_line_the_learner_reads():
    """tests/graders/planted.py: a planted mistake is caught only if the ONE line the grade shows points at it,
    and that line is not a bare IndexError, a phrase built from a fallback, or a colon with nothing after it."""
    from tests.graders import planted
    m = planted.mistake("0.1", "formula", "no collective", r"no all_reduce ran")
    assert planted.assert_caught(m, ["no all_reduce ran (saw: nothing)\nsecond failure"]).startswith("no all_reduce")
    for failures, why in ((["first line only\nno all_reduce ran"], "does not point at it"), ([], "let it pass"),
                          (["IndexError: list index out of range"], "bare IndexError"),
                          (["rank 1 ended without the a collective; no all_reduce ran"], "fallback"),
                          (["no all_reduce ran; where each rank was stuck:"], "announces")):
        with pytest.raises(AssertionError, match=why):
            planted.assert_caught(m, failures)
    planted.assert_passes("sdpa", "another way", [])
    with pytest.raises(AssertionError, match="was failed"):
        planted.assert_passes("sdpa", "another way", ["wrong"])


# ----------------------------------------------------------------- what must be reported is read as text

def test_expected_tests_read_from_the_grader_files_match_pytests_collection():
    """The recording process lists each exercise's tests without importing a grader; that list must agree
    with what pytest collects (else an exercise could never pass, or pass with tests missing)."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "exercise", "-p", "no:nbval",
                          *sorted(str(p) for p in (grade.ROOT / "tests" / "graders").glob("test_ch*.py"))],
                         cwd=grade.ROOT, capture_output=True, text=True, env=dict(os.environ, COURSE_IMPL="solutions"))
    collected = {}
    for line in out.stdout.splitlines():
        if "::" in line:
            function = line.split("[", 1)[0]
            collected[function] = collected.get(function, 0) + 1
    expected = {test: n for ex in grade.collect() for test, n in ex.tests.items()}
    assert set(expected) == set(collected), out.stdout[-2000:] + out.stderr[-2000:]
    for test, n in expected.items():
        assert n is None or n == collected[test], f"{test}: read {n} cases from the file, pytest collected " \
                                                  f"{collected[test]}"


# ------------------------------------------------------------------------------ a grade that cannot be forged

def test_a_forging_lab_module_gets_nothing(tmp_path, monkeypatch):
    """tests/fixtures/forging/warmup.py claims a pass for every test of every chapter in the test process's
    report, rewrites the final report from an atexit hook and from a detached process it leaves behind."""
    target, pids = tmp_path / "grade-report.json", tmp_path / "pids"
    monkeypatch.setenv("FORGE_TARGET", str(target))
    monkeypatch.setenv("FORGE_PIDS", str(pids))
    assert grade.main(["0", "--impl", "tests.fixtures.forging", "--json", str(target)]) == 1
    written = target.read_text()
    data = json.loads(written)
    assert (data["score"], data["total"]) == (0, 2)
    for ex in data["exercises"]:   # its claims reach no channel (not started), or one that is not trusted
        assert ex["status"] == "not started" or ex["status"] == "failed" and "not trusted" in ex["reason"], ex
    ran_in = [int(p) for p in pids.read_text().split()]
    assert ran_in and os.getpid() not in ran_in                  # never in the recording process
    assert "tests.fixtures.forging.warmup" not in sys.modules
    assert not any(_alive(p, f"FORGE_PIDS={pids}") for p in ran_in)   # the detached rewriters are gone ...
    time.sleep(0.3)
    assert target.read_text() == written                         # ... so the report stays the grader's


def test_a_forged_events_channel_and_a_killed_test_process_score_nothing(tmp_path):
    """Issue 21 item 17: a stub-only labs/ whose __init__.py (tests/fixtures/forging_init) finds the grading
    pytest among its ancestors, writes a pass for every test and "finished" into its events channel and
    SIGKILLs it, used to score full marks through --submission. The channel is now a pipe that no other
    process can open, and a child killed by a signal has its passes run again, not trusted."""
    fork = tmp_path / "fork"
    shutil.copytree(grade.ROOT / "labs", fork / "labs", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(grade.ROOT / "tests" / "fixtures" / "forging_init" / "__init__.py", fork / "labs" / "__init__.py")
    report = tmp_path / "grade.json"
    assert grade.main(["0", "--submission", str(fork), "--json", str(report)]) == 1
    data = json.loads(report.read_text())
    assert (data["score"], data["total"]) == (0, 2), data
    for ex in data["exercises"]:
        assert ex["status"] == "failed" and ("not trusted" in ex["reason"] or "signal SIGKILL" in ex["reason"]), ex


def test_a_rank_cannot_open_the_events_channel(tmp_path, monkeypatch):
    """tests/fixtures/reaching: each rank opens, for writing, every socket its test process and the grading
    process hold (/proc/PID/fd/N: how a pipe or a file, the old channels, could be reached). A socket cannot be
    opened that way, whoever asks (ENXIO, root included); an unprivileged rank may not even look (EACCES)."""
    log = tmp_path / "reach.log"
    monkeypatch.setenv("REACH_LOG", str(log))
    result = by_id(grade.run("0", impl="tests.fixtures.reaching"))
    assert {result[ex]["status"] for ex in ("0.1", "0.2")} == {"not started"}, result
    tries = log.read_text().splitlines()
    assert tries and all(re.search(r" (open ENXIO|open EACCES|list PermissionError)$", t) for t in tries), tries


def test_passes_count_only_from_a_session_that_finished_and_reads_as_one():
    """The recorder's rules (grade._judge), on event streams a forger could write: a pass reported by a child
    that then died is run again, not trusted; a second collection, a result for a test that is not running,
    a success status with a failed test, or an event after "finished" make the whole report untrusted."""
    ex = grade.Exercise("0.1", "t", "tests/graders/f.py")
    ex.tests = {"tests/graders/f.py::test_a": 1}
    test = "tests/graders/f.py::test_a"
    session = [{"event": "collected", "tests": [test]}, {"event": "start", "test": test},
               {"event": "result", "test": test, "when": "call", "status": "passed", "reason": ""},
               {"event": "finished", "exitstatus": 0}]
    assert grade._judge([ex], session, None)[0]["0.1"]["status"] == "passed"
    assert grade._judge([ex], session[:3], "was killed by signal SIGKILL") == ({}, [ex])      # run it again
    failed = dict(session[2], status="failed")
    for forged in ([session[0]] + session,                                   # collected twice
                   session[:1] + session[2:],                                # a result while nothing runs
                   session[:2] + [failed, session[3]],                       # exit status 0 after a failure
                   session + [session[2]],                                   # after "finished"
                   [dict(session[0], tests=[{}])] + session[1:]):            # malformed
        rows, again = grade._judge([ex], forged, None)
        assert not again and rows["0.1"]["status"] == "failed" and "not trusted" in rows["0.1"]["reason"], forged


def test_a_lab_that_exits_at_import_fails_and_the_report_survives(tmp_path):
    report = tmp_path / "grade.json"
    assert grade.main(["0", "--impl", "tests.fixtures.exiting", "--json", str(report)]) == 1
    result = by_id(json.loads(report.read_text())["exercises"])
    for ex in ("0.1", "0.2"):
        assert result[ex]["status"] == "failed" and "exited with code 0" in result[ex]["reason"], result[ex]


def test_a_test_process_killed_like_the_oom_killer_fails_only_its_exercise():
    result = by_id(grade.run("0", impl="tests.fixtures.killed"))
    assert result["0.1"]["status"] == "failed", result["0.1"]
    assert "killed by signal SIGKILL" in result["0.1"]["reason"] and "test_sum_of_ranks[1]" in result["0.1"]["reason"]
    assert result["0.2"]["status"] == "passed", result["0.2"]


@pytest.mark.parametrize("impl,message", [
    ("tests.fixtures.borrowing", "uses the reference answers (solutions.warmup)"),
    ("tests.fixtures.hiding", "cannot be imported while tests.fixtures.hiding/ is graded"),
])
def test_the_reference_answers_are_not_an_answer(impl, message):
    result = by_id(grade.run("0", impl=impl))
    for ex in ("0.1", "0.2"):
        assert result[ex]["status"] == "failed" and message in result[ex]["reason"], result[ex]


# ------------------------------------------------------------------------- instructors: --submission DIR

def _learner_checkout(tmp_path, fixture):
    """A learner's fork as an instructor would receive it: labs/ (here: a fixture) and a doctored course."""
    fork = tmp_path / "fork"
    (fork / "labs").mkdir(parents=True)
    (fork / "labs" / "__init__.py").write_text("")
    (fork / "labs" / "warmup.py").write_text((grade.ROOT / "tests" / "fixtures" / fixture / "warmup.py").read_text())
    (fork / "tests").mkdir()
    (fork / "tests" / "conftest.py").write_text("import os\nos.environ['COURSE_IMPL'] = 'solutions'\n")
    return fork


def test_submission_checkout_holds_the_course_and_the_learners_labs_only(tmp_path):
    fork = _learner_checkout(tmp_path, "borrowing")
    dest = tmp_path / "course"
    commit = grade.checkout_for_submission(fork, dest)
    assert re.fullmatch(r"[0-9a-f]{40}", commit)
    assert not (dest / "solutions").exists()
    assert (dest / "labs" / "warmup.py").read_text() == (fork / "labs" / "warmup.py").read_text()
    assert (dest / "tests" / "conftest.py").read_text() == \
        subprocess.run(["git", "show", "HEAD:tests/conftest.py"], cwd=grade.ROOT, capture_output=True,
                       text=True).stdout                         # the course's own, not the fork's
    assert (dest / "tests" / "graders" / "test_ch00_warmup.py").exists() and (dest / "helpers" / "grade.py").exists()
    os.symlink(grade.ROOT / "solutions" / "warmup.py", fork / "labs" / "ring.py")
    with pytest.raises(SystemExit, match="symbolic link"):
        grade.checkout_for_submission(fork, tmp_path / "course2")


def test_submission_is_graded_in_a_clean_checkout_and_no_process_lingers(tmp_path, monkeypatch):
    """The learner's own answers pass in the instructor's clean checkout; the process that the lab module
    leaves behind in a session of its own (tests/fixtures/lingering) is gone when grading ends."""
    pid_file = tmp_path / "lingering.pid"
    monkeypatch.setenv("LINGER_PID_FILE", str(pid_file))
    fork = _learner_checkout(tmp_path, "lingering")
    (fork / "labs" / "correct.py").write_text((grade.ROOT / "tests" / "fixtures" / "correct" / "warmup.py").read_text())
    (fork / "labs" / "warmup.py").write_text((fork / "labs" / "warmup.py").read_text()
                                             .replace("tests.fixtures.correct.warmup", "labs.correct"))
    report = tmp_path / "grade.json"
    assert grade.main(["0", "--submission", str(fork), "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["submission"] == str(fork) and re.fullmatch(r"[0-9a-f]{40}", data["commit"])
    assert {e["exercise"]: e["status"] for e in data["exercises"]} == {"0.1": "passed", "0.2": "passed"}
    pids = [int(p) for p in pid_file.read_text().split()]
    assert pids and not any(_alive(p, f"LINGER_PID_FILE={pid_file}") for p in pids)


@pytest.mark.skipif(not shutil.which("make"), reason="needs make")
def test_make_grade_exits_non_zero_while_work_remains_and_says_how_much():
    """make grade exits non-zero while any exercise is left (CI and the self-check workflow rely on it); the
    last line the grader prints is the count of exercises left, so make's "Error 1" on stderr is not all a
    learner sees."""
    base = ["make", "-s", "-o", ".venv/.installed", "grade", "CHAPTER=0", f"PY={sys.executable}",
            "GRADE_ARGS=--impl tests.fixtures.borrowing"]  # decided without a child: fast
    learner = subprocess.run(base, cwd=grade.ROOT, capture_output=True, text=True)
    assert learner.returncode != 0, learner.stdout
    last = learner.stdout.rstrip().splitlines()[-1]
    assert last == "score: 0/2 exercises passed; 2 exercises left", last
    assert "Error" not in learner.stdout


# ------------------------------------------------------------------ reasons, optional exercises, the table

def test_a_reason_names_the_case_that_raised():
    """A failing 1.1 used to say only "rank 0 raised RuntimeError: view size is not compatible"; the case the
    grader was checking (helpers.launch.case) travels with the error out of the rank into the reason."""
    result = by_id(grade.run("1", impl="tests.fixtures.noncontiguous"))
    reason = result["1.1"]["reason"]
    assert result["1.1"]["status"] == "failed" and "view size is not compatible" in reason, reason
    assert "[case: SUM of a non-contiguous tensor (a transposed [4, 6])]" in reason, reason
    assert reason.startswith("test_ring_all_reduce[1]: rank 0 raised RuntimeError"), reason
    assert {result[ex]["status"] for ex in ("1.2", "1.3", "1.4")} == {"not started"}
    assert "[case:" not in result["1.2"]["reason"], result["1.2"]        # a stub is not started, whatever the case


def test_optional_exercises_are_counted_apart_and_the_table_fits_100_columns():
    exercises = grade.collect()
    assert [ex.id for ex in exercises if ex.optional] == ["1.4"]
    long = "rank 2 raised AssertionError: " + "expected [0, 1, 2, 3] got [0, 1, 2, 4]; " * 30
    rows = [grade._row(ex, grade.PASSED if ex.optional else grade.FAILED, long if ex.id == "1.1" else "", [])
            for ex in exercises]
    table = grade.render(rows)
    assert max(len(line) for line in table.splitlines()) <= 100, table
    required = len(exercises) - 1
    assert table.splitlines()[-1] == (f"score: 0/{required} exercises passed; {required} exercises left "
                                      "(optional: 1/1 passed, not counted)")
    done = [dict(r, status=grade.PASSED) if not r["optional"] else dict(r, status=grade.NOT_STARTED) for r in rows]
    assert grade.summary_line(done) == f"score: {required}/{required} exercises passed; all done " \
                                       "(optional: 0/1 passed, not counted)"
    assert grade.score(done) == {"score": required, "total": required, "optional_passed": 0, "optional_total": 1}


def test_grade_a_class_in_one_command(tmp_path, capsys):
    """`--class PATH --out FILE.csv`: each learner's fork graded alone, one row per learner per exercise,
    with the fork's commit, the course commit, when and how long; a .json holds the rows and the reports."""
    import csv
    forks = tmp_path / "class"
    for learner, source in (("ada", "tests/fixtures/correct/warmup.py"), ("bob", "labs/warmup.py")):
        labs = forks / learner / "labs"
        labs.mkdir(parents=True)
        (labs / "__init__.py").write_text("")
        (labs / "warmup.py").write_text((grade.ROOT / source).read_text())
    git = ["git", "-C", str(forks / "ada"), "-c", "user.name=a", "-c", "user.email=a@b"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "mine"], check=True)
    assert list(grade.class_forks([str(forks)])) == ["ada", "bob"]       # a folder of checkouts, one per learner
    listed = tmp_path / "class.txt"
    listed.write_text(f"# one checkout per line\n{forks / 'ada'}\n{forks / 'bob'}\n")
    out = tmp_path / "class.csv"
    assert grade.main(["0", "--class", str(listed), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[2/2] bob" in printed and "score: 0/2 exercises passed; 2 exercises left" in printed, printed
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == grade.CLASS_COLUMNS
    assert [(r["learner"], r["exercise"], r["status"]) for r in rows] == [
        ("ada", "0.1", "passed"), ("ada", "0.2", "passed"),
        ("bob", "0.1", "not started"), ("bob", "0.2", "not started")]
    assert re.fullmatch(r"[0-9a-f]{40}", rows[0]["fork_commit"]) and re.fullmatch(r"[0-9a-f]{40}", rows[0]["commit"])
    assert rows[-1]["fork_commit"] == ""                         # bob's folder is no git checkout
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r["started"]) and float(r["seconds"]) > 0
               for r in rows)
    reports = [{**{k: r[k] for k in grade.CLASS_COLUMNS[:6]}, "exercises": [r]} for r in rows[:1]]
    grade.write_class_report(reports, str(tmp_path / "class.json"))
    data = json.loads((tmp_path / "class.json").read_text())
    assert data["rows"] == rows[:1] and data["learners"] == reports
    with pytest.raises(SystemExit, match="no such folder"):
        grade.class_forks([str(tmp_path / "nobody")])
