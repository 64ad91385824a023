"""`python -m instantid_cli ...`: the same as the `instantid` command."""

import sys

from .main import main

sys.exit(main())
