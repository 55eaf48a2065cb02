"""Ray job entrypoint: ``ray job submit --working-dir . -- python jobs/extract.py --dataset mvtec:PATH ...``.

Joins the cluster named by RAY_ADDRESS (set by ``ray job submit``); same options and --help as ``spg extract``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir, if not pip-installed

from spg_dist.cli import extract_cmd  # noqa: E402

if __name__ == "__main__":
    extract_cmd(prog_name="jobs/extract.py")
