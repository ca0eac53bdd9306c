import sys
from pathlib import Path

# Test helpers live beside the tests (tests/helpers.py); make them importable as `helpers`.
sys.path.insert(0, str(Path(__file__).parent))
