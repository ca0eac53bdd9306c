"""The example plugin package's own test suite (examples/epp-plugin-example/tests), run in a
subprocess so it sees the package exactly as installed (`make venv` installs it), with its own
pytest configuration and rootdir."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "epp-plugin-example"
INSTALL_HINT = (
    "epp-plugin-example is not installed in this venv; `make venv` installs it, or run "
    "`.venv/bin/python -m pip install --no-build-isolation -e examples/epp-plugin-example`"
)


def test_example_plugin_package_suite_passes() -> None:
    assert importlib.util.find_spec("epp_plugin_example") is not None, INSTALL_HINT
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout
