"""The import contract (pyproject ``[tool.importlinter]``) holds for the tree, and breaks when it should.

Each breaking case copies the product packages to a temporary folder, adds one forbidden import and
runs ``lint-imports`` on the copy: the run must fail and name the contract that caught it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import ROOT

PACKAGES = ("chatbus", "edge", "batches", "inference_workers", "retrieval_workers", "safety_workers", "consumers", "producers", "topics", "core", "schemas")
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the copy's packages shadow the installed checkout
    return subprocess.run([str(LINT), "--no-cache", str(root / "pyproject.toml")], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_every_contract() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("core/pii.py", "import consumers.stage", "Layers"),  # the ground reaching up
        ("schemas/events.py", "import core.config", "Layers"),  # contracts import nothing of ours
        ("producers/bus.py", "import consumers.runtime", "Layers"),  # producers sit below consumers
        ("batches/store.py", "import edge.app", "Layers"),  # the batch domain never imports the edge
        ("retrieval_workers/store.py", "import safety_workers.worker", "Stages never import each other"),
        ("edge/relay.py", "import inference_workers.worker", "The edge never imports a stage"),
        ("consumers/recorder.py", "import chatbus.cli", "Layers"),  # nothing imports the entry points
    ],
)
def test_a_forbidden_import_breaks_the_contract(tmp_path: Path, module: str, line: str, contract: str) -> None:
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "static", "json"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # added by the test\n")
    result = lint(tmp_path)
    assert result.returncode != 0, result.stdout
    broken = [b for b in result.stdout.split("\n\n") if "BROKEN" in b]
    assert any(contract in b for b in broken), result.stdout
    assert line.split()[-1] in result.stdout  # the report names the offending import
