"""``python -m studioserve.loadgen`` only points at the command."""

import sys

sys.exit("use `studio bench URL` (see studio bench --help)")
