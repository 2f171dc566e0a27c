"""`python -m leukoscope.cli ...`, as the `leukoscope` command."""

import sys

from leukoscope.cli import main

sys.exit(main())
