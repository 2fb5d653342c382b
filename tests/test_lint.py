"""Lint, format and types (issue 18): `ruff check`, `ruff format --check` and `mypy` over
`stream_detector/` and `training/`, run by `make test` like every other test so that CI fails on a
regression and shows why. The scope, the rules and the files left out for now are configured once,
in pyproject.toml ([tool.ruff], [tool.mypy]); each tool runs with no paths from the repository root,
as a developer would run it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("stream_detector", "training")


def tool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """`python -m ruff ...` / `python -m mypy ...` with this interpreter (the venv's tools)."""
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def report(r: subprocess.CompletedProcess[str]) -> str:
    return f"`{' '.join(map(str, r.args[2:]))}` exited {r.returncode}:\n{r.stdout}{r.stderr}"


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(("ruff", "check"), id="ruff-check"),
        pytest.param(("ruff", "format", "--check"), id="ruff-format"),
        pytest.param(("mypy",), id="mypy", marks=pytest.mark.slow),
    ],
)
def test_the_packages_are_clean(command: tuple[str, ...]) -> None:
    r = tool(*command)
    assert r.returncode == 0, report(r)


def test_the_checks_cover_every_module_but_the_excluded() -> None:
    """A narrowed `include` or a new folder must not quietly drop files from the checks."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    excluded = set(config["tool"]["ruff"].get("extend-exclude", []))
    expected = {
        p.relative_to(REPO).as_posix()
        for pkg in PACKAGES
        for p in (REPO / pkg).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    r = tool("ruff", "check", "--show-files")
    assert r.returncode == 0, report(r)
    checked = {Path(line.strip()).resolve().relative_to(REPO).as_posix() for line in r.stdout.splitlines() if line}
    assert checked == expected - excluded
    assert excluded <= expected, f"excluded files that no longer exist: {sorted(excluded - expected)}"
    assert config["tool"]["mypy"]["files"] == list(PACKAGES)


@pytest.mark.parametrize(
    "command, addition, expected",
    [
        (("ruff", "check"), "import os  # unused\n", "F401"),
        (("ruff", "format", "--check"), "x = {  'a':1 }\n", "reformat"),
    ],
    ids=["unused-import", "unformatted"],
)
def test_a_regression_fails_the_check(tmp_path: Path, command: tuple[str, ...], addition: str, expected: str) -> None:
    for name in PACKAGES:
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "stream_detector" / "core" / "events.py"
    target.write_text(target.read_text(encoding="utf-8") + addition, encoding="utf-8")
    r = tool(*command, "--no-cache", cwd=tmp_path)
    assert r.returncode != 0, report(r)
    output = (r.stdout + r.stderr).lower()
    assert expected.lower() in output and "events.py" in output, report(r)
