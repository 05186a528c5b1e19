"""The grader sorts exercises into passed / failed / not started, and survives hangs and crashes."""
import json

from helpers import grade


def by_id(exercises):
    return {e["exercise"]: e for e in exercises}


def test_wrong_answers_fail_with_the_assertion_message():
    result = by_id(grade.run("0", impl="tests.fixtures.broken"))
    assert result["0.1"]["status"] == "failed"
    assert "expected 1 on every rank, got [0, 1]" in result["0.1"]["reason"]
    assert result["0.2"]["status"] == "failed" and "rank 0" in result["0.2"]["reason"]


def test_a_crashing_worker_fails_only_its_exercise():
    result = by_id(grade.run("0", impl="tests.fixtures.crashing"))
    assert result["0.1"]["status"] == "failed" and "exited with code 3" in result["0.1"]["reason"]
    assert result["0.2"]["status"] == "passed"


def test_a_hanging_exercise_fails_only_itself(monkeypatch):
    monkeypatch.setenv("COURSE_TIMEOUT", "2")
    result = by_id(grade.run("0", impl="tests.fixtures.hanging"))
    assert result["0.1"]["status"] == "failed" and "hung" in result["0.1"]["reason"]
    assert result["0.2"]["status"] == "passed"


def test_stubs_are_not_started_and_name_the_exercise_exit_status_and_json(tmp_path, capsys):
    report = tmp_path / "grade.json"
    assert grade.main(["0", "--impl", "labs", "--json", str(report)]) == 1
    table = capsys.readouterr().out
    assert "TODO  0.1" in table and "score: 0/2 exercises passed" in table
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
