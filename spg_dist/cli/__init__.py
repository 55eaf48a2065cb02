"""The ``spg`` command: one subcommand per stage, one module per stage.

Subcommands import their stage lazily so ``spg --help`` is instant, and every expected failure (bad path,
unknown backbone, mismatched weights) is one line on stderr with a non-zero exit, never a traceback.
``jobs/*.py`` reuse the commands (``extract_cmd`` ...) so a submitted job takes exactly the CLI's options.
"""

from spg_dist.cli.base import DEFAULT_STORE, main
from spg_dist.cli.data import extract_cmd, run_extract, store_check_cmd, store_group
from spg_dist.cli.demo import demo_cmd
from spg_dist.cli.stage1 import encode_cmd, train_sae_cmd
from spg_dist.cli.stage2 import detect_cmd, detectors_cmd, evaluate_cmd, train_guides_cmd
from spg_dist.cli.sweep import reproduce_cmd, sweep_cmd, sweep_group

__all__ = ["DEFAULT_STORE", "store_check_cmd", "store_group", "demo_cmd", "detect_cmd", "detectors_cmd", "reproduce_cmd", "sweep_cmd", "sweep_group", "encode_cmd", "evaluate_cmd", "extract_cmd", "main", "run_extract",
           "train_guides_cmd", "train_sae_cmd"]
