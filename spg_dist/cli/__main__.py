"""``python -m spg_dist.cli`` is ``spg``."""

import sys

from spg_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(prog_name="spg"))
