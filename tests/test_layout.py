"""The layout keeps its promises: labs/X.py is solutions/X.py with each exercise body replaced by a stub (same
module docstring, same top-level names, same docstrings, same given code), and no line of Python is longer
than 120 characters.

A reference answer may use private helpers of its own (`_ring`, `_exchange` in solutions/ring_collectives.py)
and the imports they need: those are part of the answer, so solutions/ may have `_names` and imports that
labs/ lacks. Everything else is the same in both."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAIRS = sorted(p.relative_to(ROOT / "labs") for p in (ROOT / "labs").rglob("*.py")
               if (ROOT / "solutions" / p.relative_to(ROOT / "labs")).exists())
MAX_LINE = 120


def _is_stub(node) -> bool:
    """A function or class whose code raises NotImplementedError("Exercise ...") somewhere: an exercise."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Raise) and isinstance(sub.exc, ast.Call) and \
                getattr(sub.exc.func, "id", None) == "NotImplementedError" and sub.exc.args and \
                isinstance(sub.exc.args[0], ast.Constant) and str(sub.exc.args[0].value).startswith("Exercise"):
            return True
    return False


def _top_level_names(tree) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _definitions(tree, prefix=""):
    """{qualified name: node} for every function, class and method (nested in classes), in order."""
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            found[name] = node
            if isinstance(node, ast.ClassDef):
                found.update(_definitions(node, f"{name}."))
    return found


def _parse(side, rel):
    return ast.parse((ROOT / side / rel).read_text())


@pytest.mark.parametrize("rel", PAIRS, ids=str)
def test_same_module_docstring(rel):
    assert ast.get_docstring(_parse("labs", rel)) == ast.get_docstring(_parse("solutions", rel)), \
        f"labs/{rel} and solutions/{rel} have different module docstrings"


def _answer_only(tree) -> set[str]:
    """Names a reference answer may have for itself: private names and imported modules."""
    imported = {(a.asname or a.name).split(".")[0] for node in tree.body
                if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
    return {n for n in _top_level_names(tree) if n.startswith("_")} | imported


@pytest.mark.parametrize("rel", PAIRS, ids=str)
def test_same_top_level_names(rel):
    lab_tree, sol_tree = _parse("labs", rel), _parse("solutions", rel)
    lab, sol = _top_level_names(lab_tree), _top_level_names(sol_tree)
    only_sol = sol - lab - _answer_only(sol_tree)
    assert lab <= sol and not only_sol, \
        f"only in labs/{rel}: {sorted(lab - sol)}; only in solutions/{rel}: {sorted(only_sol)}"


@pytest.mark.parametrize("rel", PAIRS, ids=str)
def test_same_docstrings(rel):
    sol_tree = _parse("solutions", rel)
    lab, sol = _definitions(_parse("labs", rel)), _definitions(sol_tree)
    private = _answer_only(sol_tree)
    missing = sorted(n for n in set(sol) - set(lab) if n.split(".")[0] not in private)
    assert set(lab) <= set(sol) and not missing, f"definitions differ: {sorted(set(lab) - set(sol)) + missing}"
    differ = [name for name in lab if ast.get_docstring(lab[name]) != ast.get_docstring(sol[name])]
    assert not differ, f"labs/{rel} and solutions/{rel}: different docstrings for {differ}"


@pytest.mark.parametrize("rel", PAIRS, ids=str)
def test_given_code_is_the_same(rel):
    """Every function or class that is not an exercise stub in labs/ is the same code in solutions/."""
    lab_tree, sol_tree = _parse("labs", rel), _parse("solutions", rel)
    lab, sol = _definitions(lab_tree), _definitions(sol_tree)
    differ = [name for name, node in lab.items() if name in sol and not _is_stub(node)
              and ast.dump(node) != ast.dump(sol[name])]
    assert not differ, f"given code differs between labs/{rel} and solutions/{rel}: {differ}"
    # and the module-level code outside definitions (imports, constants)
    private = _answer_only(sol_tree)

    def rest(tree):
        """Module-level statements other than definitions, imports and the answer's private constants."""
        out = []
        for n in tree.body[1:] if ast.get_docstring(tree) is not None else tree.body:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)):
                continue
            names = {t.id for t in ast.walk(n) if isinstance(t, ast.Name) and isinstance(t.ctx, ast.Store)}
            if names and names <= private:
                continue
            out.append(ast.dump(n))
        return out
    assert rest(lab_tree) == rest(sol_tree), f"labs/{rel} and solutions/{rel}: module-level statements differ"


# Files with lines still to wrap, owned by work in progress elsewhere (wrap them, then drop them from here).
# Every other .py file under helpers/, labs/, solutions/ and tests/ is checked.
WRAP_PENDING: set[str] = set()


def _python_files():
    for top in ("helpers", "labs", "solutions", "tests"):
        yield from sorted((ROOT / top).rglob("*.py"))


def test_no_line_over_120_characters():
    long = [f"{path.relative_to(ROOT)}:{i} ({len(line)})"
            for path in _python_files() if str(path.relative_to(ROOT)) not in WRAP_PENDING
            for i, line in enumerate(path.read_text().splitlines(), 1) if len(line) > MAX_LINE]
    assert not long, f"lines over {MAX_LINE} characters: " + ", ".join(long)


# Chapter 7 benchmarks written before the rule (helpers/bench.py's docstring); follow it, then drop them from here.
BENCH_RULE_PENDING: set[str] = set()


@pytest.mark.parametrize("path", sorted((ROOT / "helpers" / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_benchmarks_take_the_implementation_from_helpers_bench(path):
    """helpers/bench.py sets COURSE_IMPL once (--impl); a benchmark gets exercises with load_impl only: it never
    imports labs/solutions itself and never names COURSE_IMPL in its code."""
    if path.name in BENCH_RULE_PENDING:
        pytest.skip("written before the rule; listed in BENCH_RULE_PENDING")
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and ast.get_docstring(n) is not None}
    for node in ast.walk(tree):
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        bad = [m for m in modules if m.split(".")[0] in ("labs", "solutions")]
        assert not bad, f"{path.name}:{node.lineno} imports {bad}: use load_impl(...) (see helpers/bench.py)"
        if isinstance(node, ast.Constant) and node.value == "COURSE_IMPL" and id(node) not in docstrings:
            raise AssertionError(f"{path.name}:{node.lineno} names COURSE_IMPL: helpers/bench.py sets it, once")
