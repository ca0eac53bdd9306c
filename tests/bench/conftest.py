import sys
from pathlib import Path

# `benchmarks` is a plain package at the repository root (run as `python -m benchmarks.…`), not installed.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
