"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/evaluate.py ...`; same options as `spg evaluate`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir, if not pip-installed

from spg_dist.cli import evaluate_cmd  # noqa: E402

if __name__ == "__main__":
    evaluate_cmd(prog_name="jobs/evaluate.py")
