"""Ray job entrypoint: ``ray job submit --working-dir . -- python jobs/sweep.py --config configs/sweep-demo.yaml
--store /shared/store``. Joins the cluster named by RAY_ADDRESS; same options and --help as ``spg sweep``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir, if not pip-installed

from spg_dist.cli import sweep_cmd  # noqa: E402

if __name__ == "__main__":
    sweep_cmd(prog_name="jobs/sweep.py")
