"""``python -m llmepp_sim`` = ``epp-sim``."""

import sys

from llmepp_sim.cli import main

sys.exit(main())
