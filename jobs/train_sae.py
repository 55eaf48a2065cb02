"""Ray job entrypoint: ``ray job submit --working-dir . -- python jobs/train_sae.py --backbone B -C 4096 -k 32``.

Same options and --help as ``spg train-sae``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir, if not pip-installed

from spg_dist.cli import train_sae_cmd  # noqa: E402

if __name__ == "__main__":
    train_sae_cmd(prog_name="jobs/train_sae.py")
