"""A worker node lost in the middle of a job, on a real three-node Ray cluster on this machine (`ray start --head` +
two `ray start --address` workers, one CPU each), jobs submitted the way a user does (`ray job submit
--working-dir . -- python jobs/...`); the node is lost by SIGKILLing its whole process group (raylet, object store,
workers) while the job runs, and a replacement node joins before the next test.

* extraction: the node of a backbone actor is lost -> the job finishes (the lost work is extracted again on the
  nodes left); every image stored exactly once, its images row complete, and a re-run has nothing left to do;
* SAE training (Ray Train, DDP over 2 workers, FailureConfig): the node of a training worker is lost after a
  checkpoint -> the run resumes from it and finishes; its SAE weights are bit-identical to those of the same
  command run uninterrupted in another store;
* sweep: the node of a running trial group is lost -> the group is retried on another node (or, were its retries
  spent, a re-run of the same command finishes it); every trial finished, one eval_results row per key.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from spg_dist.store import Store

from cluster import LocalCluster

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["worker_a", "worker_b"]
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # a dead raylet fails its health checks at once (connection refused): checked every second (default 3 s), a
    # lost node is marked dead after ~5 s instead of ~15 s; a live one still has the default 10 s to answer each
    c = LocalCluster(tmp_path_factory.mktemp("nodeloss"), head_cpus=1,
                     system_config={"health_check_period_ms": 1000})
    c.start_head()
    try:
        for label in LABELS:
            c.add_worker(cpus=1, label=label)
        c.wait_nodes(3)
        yield c
    finally:
        c.stop()


@pytest.fixture()
def three_nodes(cluster):
    """The module's cluster with both worker nodes live (a replacement for any node an earlier test lost)."""
    cluster.ensure_workers(LABELS)
    yield cluster
    cluster.ensure_workers(LABELS)  # the node lost here comes back while this test's results are checked


def _tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


def run_losing_a_node(cluster: LocalCluster, entrypoint: list[str], log: Path, find, ready=lambda: True,
                      settle: float = 0.0, timeout: float = 420) -> tuple[int, str, dict]:
    """Submit ``entrypoint``; poll ``find()`` for the label of the worker node to lose, then ``ready()``; wait
    ``settle`` s and kill that node; then wait for the job. Returns (exit code, output, timings). A job still
    running ``timeout`` s after the kill is stopped and fails the test (the hang this file guards against)."""
    t0 = time.time()
    job = cluster.submit_async(entrypoint, ROOT, log)
    label = None
    try:
        while label is None or not ready():
            assert job.poll() is None, f"the job ended before a node was lost:\n{_tail(log)}"
            assert time.time() - t0 < timeout, f"no node to lose turned up:\n{_tail(log)}"
            label = label or find()
            time.sleep(0.2)
        time.sleep(settle)
        assert job.poll() is None, f"the job ended before a node was lost:\n{_tail(log)}"
        cluster.kill_worker(label)
        t_kill = time.time()
        try:
            rc = job.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"job still running {timeout:.0f} s after node {label} was lost (hung):\n{_tail(log)}")
    finally:
        if job.poll() is None:
            job.kill()
            cluster.stop_jobs()
    timings = {"lost": label, "kill_at_s": round(t_kill - t0, 1), "end_after_kill_s": round(time.time() - t_kill, 1)}
    print(f"{entrypoint[1]}: {timings}")
    return rc, log.read_text(errors="replace"), timings


def _images(root: Path, n: int) -> Path:
    """``n`` small distinct PNGs in 4 category folders (a ``folder:`` dataset)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / f"c{i % 4}" / f"{i:04d}.png")
    return root


def test_extraction_survives_a_lost_node(three_nodes, tmp_path):
    n = 480
    data = _images(tmp_path / "imgs", n)
    store = tmp_path / "store"
    cmd = ["python", "jobs/extract.py", "--dataset", f"folder:{data}", "--backbone", "tiny-dinov3", "--image-size",
           "64", "--batch-size", "4", "--workers", "2", "--commit-every", "2", "--store", str(store), "--quiet"]
    rc, out, _ = run_losing_a_node(three_nodes, cmd, tmp_path / "extract.log", settle=3,
                                   find=lambda: three_nodes.find_worker(actor="EncodeActor", timeout=60))
    assert rc == 0, out[-6000:]
    assert f"{n} images already stored" not in out  # the job extracted, not a re-run

    s = Store(store)
    rows = s.read("patch_tokens", columns=["backbone", "layer", "image_id"])
    keys = list(zip(*(rows.column(c).to_pylist() for c in ("backbone", "layer", "image_id"))))
    assert len(keys) == n and len(set(keys)) == n  # every image once: nothing lost, nothing twice
    ids = s.read("images", columns=["image_id", "width", "height"]).to_pylist()
    assert len(ids) == n and {r["image_id"] for r in ids} == {k[2] for k in keys}
    assert all(r["width"] == 64 and r["height"] == 64 for r in ids)

    three_nodes.ensure_workers(LABELS)
    again = three_nodes.submit(cmd, working_dir=ROOT)  # the same command again: nothing left to do
    assert again.returncode == 0, again.stdout[-3000:]
    assert f"0 patch_tokens rows written, {n} images already stored" in again.stdout
    assert s.count("patch_tokens") == n


def _train_cmd(store: Path) -> list[str]:
    return ["python", "jobs/train_sae.py", "--store", str(store), "--backbone", "bb", "-C", "32", "-k", "4",
            "--batch-tokens", "64", "--epochs", "4", "--workers", "2", "--cpus-per-worker", "1",
            "--checkpoint-every", "8", "--log-every", "8", "--max-failures", "2", "--run-name", "nodeloss"]


@pytest.mark.soak
def test_sae_training_resumes_after_a_lost_node_bit_identical(three_nodes, tmp_path):
    from test_train_sae import make_token_store

    from spg_dist.sae import TopKSAE

    lost, whole = tmp_path / "lost" / "store", tmp_path / "whole" / "store"
    make_token_store(lost)
    make_token_store(whole)  # the same tokens in another store
    snapshot = lost / "_runs" / "nodeloss" / "checkpoint_manager_snapshot.json"

    def checkpointed() -> bool:  # Ray Train registered a checkpoint (a folder alone may not be registered yet)
        try:
            return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
        except (OSError, ValueError):
            return False

    rc, out, _ = run_losing_a_node(three_nodes, _train_cmd(lost), tmp_path / "train.log", ready=checkpointed,
                                   find=lambda: three_nodes.find_worker(actor="RayTrainWorker", timeout=60))
    assert rc == 0, out[-6000:]
    got = Store(lost).read("sae_models").to_pylist()
    assert len(got) == 1 and got[0]["steps"] == 4 * 64 * 16 // 64
    assert json.loads(got[0]["config"])["resumed_from_step"] > 0  # resumed from a checkpoint, not started over

    three_nodes.ensure_workers(LABELS)  # the uninterrupted run on three nodes again
    t0 = time.time()
    ref = three_nodes.submit(_train_cmd(whole), working_dir=ROOT)
    print(f"uninterrupted run: {time.time() - t0:.1f} s")
    assert ref.returncode == 0, ref.stdout[-4000:]
    want = Store(whole).read("sae_models").to_pylist()
    assert json.loads(want[0]["config"])["resumed_from_step"] == 0
    assert got[0]["weights"] == want[0]["weights"]  # bit-identical safetensors
    a, b = TopKSAE.from_bytes(got[0]["weights"]), TopKSAE.from_bytes(want[0]["weights"])
    assert all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a.state_dict().values(),
                                                                     b.state_dict().values()))


@pytest.mark.soak
def test_sweep_survives_a_lost_node(three_nodes, tmp_path):
    from spg_dist.data.synth import synthesize

    data = tmp_path / "data"
    for layout in ("mvtec", "visa"):
        synthesize(data / f"synth_{layout}", layout=layout, seed=0, n_train=4, n_test_good=1, n_test_bad=2,
                   image_size=64)
    cfg = yaml.safe_load((ROOT / "configs" / "sweep-demo.yaml").read_text())
    cfg.update(name="nodeloss-sweep",
               data={"synth_mvtec": f"mvtec:{data / 'synth_mvtec'}", "synth_visa": f"visa:{data / 'synth_visa'}"},
               stage1={"epochs": 25, "batch_tokens": 64, "lr": 0.001, "log_every": 1000})  # SPG groups: ~10 s
    cfg["grid"].update(C=[32], k=[4], guides=[{"preset": "classical"}], pooling=["max"])
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(cfg))
    store = tmp_path / "store"
    cmd = ["python", "jobs/sweep.py", "--config", str(config), "--store", str(store), "--quiet"]
    labels = three_nodes.worker_nodes()  # {node id: label}

    def spg_group_on_a_worker():  # an SPG group is running (training its SAEs) on a worker node: lose that node
        if not store.exists() or not Store(store).has_table("sweep_trials"):
            return None
        rows = Store(store).read("sweep_trials", columns=["detector", "status", "node_id"]).to_pylist()
        return next((labels[r["node_id"]] for r in rows
                     if r["detector"] == "spg" and r["status"] == "running" and r["node_id"] in labels), None)

    rc, out, _ = run_losing_a_node(three_nodes, cmd, tmp_path / "sweep.log", find=spg_group_on_a_worker)
    s = Store(store)
    status = s.read("sweep_trials").to_pandas()
    if rc != 0 or set(status.status) != {"finished"}:  # a group's retries spent: the same command finishes it
        three_nodes.ensure_workers(LABELS)
        again = three_nodes.submit(cmd, working_dir=ROOT)
        assert again.returncode == 0, again.stdout[-4000:]
        out = again.stdout
    else:
        assert "4 trials, 4 finished, 0 failed" in out, out[-4000:]

    trials = s.read("sweep_trials").to_pandas()
    assert len(trials) == 4 and set(trials.status) == {"finished"}, trials[["trial_id", "status", "error"]]
    assert trials.attempt.max() >= 2  # the lost node's group ran again
    ev = s.read("eval_results").to_pandas()
    key = ["run", "detector", "target_dataset", "category", "metric"]
    assert not ev.duplicated(key).any()  # one row per (run, detector, target, category, metric)
    assert set(ev.run) == set(trials.run)
    metrics = set(ev.metric)
    images = s.read("images", columns=["dataset", "category", "split"]).to_pandas()
    for t in trials.itertuples():  # every trial: each test category of its target and the mean, every metric
        target = json.loads(t.config)["target"]
        cats = set(images[(images.dataset == target) & (images.split == "test")].category) | {"mean"}
        mine = ev[ev.run == t.run]
        assert len(mine) == len(cats) * len(metrics), t.run
        assert set(zip(mine.category, mine.metric)) == {(c, m) for c in cats for m in metrics}, t.run
