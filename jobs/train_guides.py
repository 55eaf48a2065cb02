"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/train_guides.py ...`; same options as `spg train-guides`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir, if not pip-installed

from spg_dist.cli import train_guides_cmd  # noqa: E402

if __name__ == "__main__":
    train_guides_cmd(prog_name="jobs/train_guides.py")
