"""labs/ holds stubs, solutions/ the answers: same modules, same names, same signatures; every stub names its
exercise; and the grader reports every stub as "not started" (never passed, never silently skipped)."""
import ast
import importlib
import inspect
import pathlib
import re

import pytest

from helpers import grade

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAB_FILES = sorted(p.relative_to(ROOT / "labs") for p in (ROOT / "labs").rglob("*.py") if p.name != "__init__.py")
EXERCISE_MARKS = {m for f in (ROOT / "tests" / "graders").glob("test_ch*.py")
                  for m in re.findall(r'pytest\.mark\.exercise\(\s*"([\d.]+)"', f.read_text())}


def _module_name(rel):
    return ".".join(rel.with_suffix("").parts)


def _stub_exercises(path):
    """Exercise ids of the functions in a file whose body still raises NotImplementedError("Exercise N.M...")."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and \
                getattr(node.exc.func, "id", None) == "NotImplementedError":
            msg = node.exc.args[0].value if node.exc.args and isinstance(node.exc.args[0], ast.Constant) else ""
            found.append(msg)
    return found


def test_labs_and_solutions_mirror_each_other():
    sols = sorted(p.relative_to(ROOT / "solutions") for p in (ROOT / "solutions").rglob("*.py")
                  if p.name != "__init__.py")
    assert LAB_FILES == sols


@pytest.mark.parametrize("rel", LAB_FILES, ids=str)
def test_same_public_names_and_signatures(rel):
    lab = importlib.import_module(f"labs.{_module_name(rel)}")
    sol = importlib.import_module(f"solutions.{_module_name(rel)}")
    names = lambda m: {n for n, v in vars(m).items() if not n.startswith("_")
                       and (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == m.__name__}
    assert names(lab) == names(sol)
    for name in names(lab):
        a, b = getattr(lab, name), getattr(sol, name)
        if inspect.isfunction(a):
            assert inspect.signature(a) == inspect.signature(b), \
                f"{name}: {inspect.signature(a)} vs {inspect.signature(b)}"


@pytest.mark.parametrize("rel", LAB_FILES, ids=str)
def test_every_stub_names_a_graded_exercise(rel):
    for msg in _stub_exercises(ROOT / "labs" / rel):
        m = re.match(r"Exercise (\d+\.\d+): ", msg)
        assert m, f"labs/{rel}: stub message {msg!r} must start with 'Exercise N.M: '"
        assert m[1] in EXERCISE_MARKS, f"labs/{rel}: exercise {m[1]} has no grader (@pytest.mark.exercise)"


def test_solutions_contain_no_stubs():
    for rel in LAB_FILES:
        assert not _stub_exercises(ROOT / "solutions" / rel), f"solutions/{rel} still raises NotImplementedError"


def test_grader_reports_every_stub_as_not_started():
    stubbed = {re.match(r"Exercise (\d+\.\d+)", m)[1] for rel in LAB_FILES
               for m in _stub_exercises(ROOT / "labs" / rel) if re.match(r"Exercise (\d+\.\d+)", m)}
    # One child for every grader file: the stubs cannot tamper with the run (a learner is graded one file per child).
    results = {e["exercise"]: e for e in grade.run(impl="labs", child_per_file=False)}
    for ex in sorted(stubbed):
        assert ex in results, f"exercise {ex} was not graded at all"
        assert results[ex]["status"] == "not started", f"exercise {ex} is a stub but graded {results[ex]}"


def test_no_shipped_class_counts_as_partly_written():
    """The fallback names the methods still missing only where a learner wrote some (helpers/impl.py): as shipped,
    every exercise class is a whole stub, so no line may claim a method of the learner's."""
    from helpers.impl import partly_written_classes
    found = {str(rel): partly_written_classes(ROOT / "labs" / rel, ROOT / "solutions" / rel) for rel in LAB_FILES}
    assert not {rel: classes for rel, classes in found.items() if classes}
