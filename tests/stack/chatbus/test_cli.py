"""The `chatbus` command line against the real stack, as a person would run it (a subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chatbus.stack import Stack
from core.config import ROOT

pytestmark = pytest.mark.stack


def chatbus(stack: Stack, *args: str, timeout: float = 120) -> str:
    proc = subprocess.run([sys.executable, "-m", "chatbus.cli", *args], env=stack.env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_ingest_then_chat_streams_an_answer_with_its_citation(stack: Stack, tmp_path: Path) -> None:
    doc = tmp_path / "wombat-cache.md"
    doc.write_text("# Wombat cache\n\nThe wombat cache evicts cubic entries first, because wombats stack cubes.\n")
    out = chatbus(stack, "ingest", str(doc))
    assert "1 ingested (1 chunks" in out, out
    out = chatbus(stack, "chat", "Which entries does the wombat cache evict first?", "--max-tokens", "8")
    assert "[finish_reason: " in out and "[usage: " in out
    assert str(doc) in out  # the citation line


def test_operator_views(stack: Stack) -> None:
    assert "chat.requests" in chatbus(stack, "topics")
    lag = chatbus(stack, "lag").splitlines()
    assert lag[0].split()[:3] == ["group", "topic", "part"] and len(lag) > 1
    chatbus(stack, "dlq", "-n", "5")
    status = chatbus(stack, "stack", "status")
    assert all(f"{name}" in status for name in ("kafka", "ferretdb", "edge"))
    assert "stopped" not in status


@pytest.mark.parametrize("group", ["batch", "models", "feedback", "dpo", "stack"])
def test_every_command_group_answers_help_under_python_m(group: str) -> None:
    """``python -m chatbus.cli GROUP --help`` finds every group (``main()`` runs after all are defined)."""
    proc = subprocess.run([sys.executable, "-m", "chatbus.cli", group, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Usage:" in proc.stdout, proc.stderr[-2000:]
