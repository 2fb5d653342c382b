"""The dependency rule between the subpackages (pyproject.toml, [tool.importlinter]): core <- logs <- config <-
ingest <- service, offline; training -> core/logs/ingest/offline, no torch in the runtime. Checked with
import-linter over the real import graph, and shown to catch an upward import in a copy of the tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT_IMPORTS, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_the_dependency_rule() -> None:
    r = lint_imports(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.mark.parametrize("module, upward_import, contract", [
    ("stream_detector/core/events.py", "from stream_detector.service import loop", "stream_detector layers"),
    ("stream_detector/config.py", "from stream_detector.service import kafka_io", "stream_detector layers"),
    ("stream_detector/logs/parse.py", "from stream_detector.offline import datafiles", "stream_detector layers"),
    ("stream_detector/offline/replay.py", "from stream_detector.service import kafka_io", "stream_detector layers"),
    ("stream_detector/ingest/decode.py", "from stream_detector.offline import datafiles", "stream_detector layers"),
    ("stream_detector/core/scorer.py", "import torch", "never imports torch"),
    ("training/fit.py", "from stream_detector.service import loop", "never on the Kafka service"),
])
def test_an_upward_import_breaks_the_rule(tmp_path: Path, module: str, upward_import: str, contract: str) -> None:
    for name in ("stream_detector", "training"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{upward_import}  # an upward import\n")
    r = lint_imports(tmp_path)
    assert r.returncode != 0, r.stdout
    broken = [ln for ln in r.stdout.splitlines() if ln.rstrip().endswith("BROKEN")]
    assert any(contract in b for b in broken), r.stdout
