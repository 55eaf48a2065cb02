"""Ray job entrypoint: ``ray job submit --working-dir . -- python jobs/detect.py --method knn --target T ...``.

Same options and --help as ``spg detect``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir, if not pip-installed

from spg_dist.cli import detect_cmd  # noqa: E402

if __name__ == "__main__":
    detect_cmd(prog_name="jobs/detect.py")
