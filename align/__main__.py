"""`python -m align ...` (and `accelerate launch -m align ...`): the same as the `align` command."""

import sys

from align.cli import main

sys.exit(main())
