import sys
from pathlib import Path

from hypothesis import settings

# Test helpers live beside the tests (tests/helpers.py); make them importable as `helpers`.
sys.path.insert(0, str(Path(__file__).parent))

# No per-example deadline (Hypothesis's default is 200 ms): on a starved CI machine one slow example of a fast
# property is a pause, not a failure. Property tests that need other settings still set them with @settings.
settings.register_profile("epp", deadline=None)
settings.load_profile("epp")
