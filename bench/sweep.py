"""The demo sweep (configs/sweep-demo.yaml on the demo store's tokens) three ways, in the same process on the same
data, into fresh stores:

* shared + concurrent: what `spg sweep` does (one SAE pass per (direction, seed) for every (C, k), each SAE reused
  by every guide and pooling setting, trial groups as concurrent Ray tasks);
* shared, one group at a time (each task asks for every CPU, so groups run one after another);
* alone: every trial trains its own SAE in its own pass, one at a time (the baseline).

    python bench/sweep.py --demo-store demo_out/store      # after `spg demo`; about 10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-store", default="demo_out/store", help="a store holding the demo's tokens")
    ap.add_argument("--config", default=str(ROOT / "configs" / "sweep-demo.yaml"))
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()

    from spg_dist.ray.runtime import ensure_ray
    from spg_dist.ray.sweep import run_sweep
    from spg_dist.stages.plans import SweepPlan

    base = yaml.safe_load(Path(args.config).read_text())
    base["grid"]["detectors"] = ["spg"]
    ensure_ray(num_cpus=args.num_cpus)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, over in (("shared + concurrent", {}),
                           ("shared, one group at a time", {"resources": {"cpus": args.num_cpus}}),
                           ("alone, one trial at a time", {"resources": {"cpus": args.num_cpus}, "share": False})):
            store = Path(tmp) / mode.replace(" ", "_").replace(",", "").replace("+", "")
            for table in ("patch_tokens", "images"):  # the same extracted tokens for every mode
                shutil.copytree(Path(args.demo_store) / f"{table}.lance", store / f"{table}.lance")
            plan = SweepPlan.from_dict({**base, **over, "name": "bench"})
            t0 = time.perf_counter()
            r = run_sweep(str(store), plan, progress=False, echo=lambda _: None)
            seconds = time.perf_counter() - t0
            from spg_dist.store import Store

            saes = Store(str(store)).count("sae_models")
            rows.append((mode, r.trials, r.finished, saes, seconds))
            print(f"{mode:30s} {r.finished:3d}/{r.trials} trials  {saes:3d} SAEs trained  {seconds:7.1f} s", flush=True)
    ref = rows[-1][-1]
    print("\nwall time against every trial alone, one at a time:")
    for mode, _, _, saes, seconds in rows:
        print(f"  {mode:30s} {seconds:7.1f} s  {ref / seconds:5.2f}x")


if __name__ == "__main__":
    main()
