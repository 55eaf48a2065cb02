"""Ray job entrypoint: ``ray job submit --working-dir . -- python jobs/reproduce.py --config configs/paper.yaml
--data mvtec=/data/mvtec --data visa=/data/visa --weights dinov3-vitl16=/models/dinov3 --seeds 3``.

Same options and --help as ``spg reproduce``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir, if not pip-installed

from spg_dist.cli import reproduce_cmd  # noqa: E402

if __name__ == "__main__":
    reproduce_cmd(prog_name="jobs/reproduce.py")
