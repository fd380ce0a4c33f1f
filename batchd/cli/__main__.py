"""`python -m batchd`: the same as the `batchd` command."""

import sys

from batchd.cli.main import main

sys.exit(main())
