import sys

from llmepp.cli import main

sys.exit(main())
