"""`python -m align.serve ...`: the same as `align serve ...`, without building the other commands' parsers."""

import argparse
import sys

from align.core.errors import UserError
from align.serve import add_arguments, run

parser = argparse.ArgumentParser(prog="align serve", description=__doc__)
add_arguments(parser)
try:
    sys.exit(run(parser.parse_args()))
except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
