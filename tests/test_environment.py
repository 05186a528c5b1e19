"""environment.yml (conda) and pyproject.toml (pip) pin the same packages; the pins are what is installed."""
import pathlib
import re
import tomllib
from importlib.metadata import version

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _pyproject_pins():
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def test_environment_yml_matches_pyproject():
    conda = set(re.findall(r"^\s*-\s+([A-Za-z0-9_.\-\[\]]+==[^\s#]+)", (ROOT / "environment.yml").read_text(), re.M))
    assert conda == _pyproject_pins(), f"only in environment.yml: {conda - _pyproject_pins()}; " \
                                       f"only in pyproject.toml: {_pyproject_pins() - conda}"


def test_every_dependency_is_pinned_exactly_and_installed():
    for pin in _pyproject_pins():
        name, sep, wanted = pin.partition("==")
        assert sep, f"{pin!r} is not an exact pin: stored notebook outputs depend on exact versions"
        assert version(name).split("+")[0] == wanted, f"{name} {version(name)} is installed, {wanted} is pinned"


def test_no_deps_packages_of_the_makefile_are_installed():
    line = next(l for l in (ROOT / "Makefile").read_text().splitlines() if l.startswith("NODEPS_PINS"))
    for pin in line.split(":=")[1].split():
        name, _, wanted = pin.partition("==")
        assert version(name) == wanted, f"{name}: {version(name)} installed, Makefile pins {wanted}"
        assert f"--no-deps {pin}" in (ROOT / "environment.yml").read_text(), f"environment.yml should mention {pin}"
