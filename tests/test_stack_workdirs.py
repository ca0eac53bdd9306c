"""The dev/test stack's work directory (configs, logs) does not pile up in /tmp after killed runs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from llmepp.testing.stack import Stack


def test_a_new_stack_removes_the_work_directories_of_killed_stacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned, running, unowned = (tmp_path / f"epp-stack-{name}" for name in ("abandoned", "running", "unowned"))
    for d in (abandoned, running, unowned):
        d.mkdir()
        (d / "epp.log").write_text("...")
    (abandoned / "owner.pid").write_text(dead.stdout.strip())
    (running / "owner.pid").write_text(str(os.getpid()))
    stack = Stack()
    try:
        assert not abandoned.exists()
        assert running.exists() and unowned.exists()
        assert (stack.workdir / "owner.pid").read_text() == str(os.getpid())
    finally:
        asyncio.run(stack.stop())
