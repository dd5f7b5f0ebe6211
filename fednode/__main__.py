"""`python -m fednode`: the fednode command line (see fednode.cli)."""

import sys

from fednode.cli import main

sys.exit(main())
