"""A sweep on a real three-node Ray cluster on this machine (`ray start --head` + two `ray start --address` worker
nodes, every port explicit), submitted the way a user does: `ray job submit --working-dir . -- python
jobs/sweep.py ...`; its trial groups spread over the nodes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from spg_dist.store import Store

from cluster import LocalCluster

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory):
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"), head_cpus=1)
    cluster.start_head()
    try:
        cluster.add_worker(cpus=1, label="worker_a")
        cluster.add_worker(cpus=1, label="worker_b")
        cluster.wait_nodes(3)
        yield cluster
    finally:
        cluster.stop()


def test_sweep_job_spreads_trials_over_the_nodes(three_nodes, tmp_path):
    from spg_dist.data.synth import synthesize

    data = tmp_path / "data"
    for layout in ("mvtec", "visa"):
        synthesize(data / f"synth_{layout}", layout=layout, seed=0, n_train=4, n_test_good=1, n_test_bad=2,
                   image_size=64)
    cfg = yaml.safe_load((ROOT / "configs" / "sweep-demo.yaml").read_text())
    cfg.update(name="cluster-sweep",
               data={"synth_mvtec": f"mvtec:{data / 'synth_mvtec'}", "synth_visa": f"visa:{data / 'synth_visa'}"},
               stage1={"epochs": 1, "batch_tokens": 256, "lr": 0.001})
    cfg["grid"].update(C=[32], k=[4], guides=[{"preset": "classical"}], pooling=["max"])
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(cfg))
    store = tmp_path / "store"  # absolute: a submitted job runs in a temporary copy of the working dir
    out = three_nodes.submit(["python", "jobs/sweep.py", "--config", str(config), "--store", str(store), "--quiet"],
                             working_dir=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert "4 trials, 4 finished, 0 failed" in out.stdout
    trials = Store(store).read("sweep_trials").to_pandas()
    assert set(trials.status) == {"finished"} and len(trials) == 4
    assert trials.node_id.nunique() >= 2, trials[["trial_id", "node_id"]]
