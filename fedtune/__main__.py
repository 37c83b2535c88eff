"""``python -m fedtune``: the same command line as ``fedtune``."""

import sys

from fedtune.cli import main

sys.exit(main())
