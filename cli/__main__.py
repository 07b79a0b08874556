"""`python -m cli ...` is the `cortex` command (subprocesses use it to run Cortex itself)."""

import sys

from cli.main import main

sys.exit(main())
