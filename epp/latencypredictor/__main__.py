import sys

from llmepp.latencypredictor.cli import main

sys.exit(main())
