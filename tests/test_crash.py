"""Crash consistency: a driver killed mid-extraction loses at most its last commit window, leaves no process of
ours behind, and the re-run completes with exact counts; a corrupt or truncated SAE checkpoint falls back to the
newest good one with one line naming what was skipped; a tokens/images gap left by an older version is restored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spg_dist.store import Store

pytestmark = pytest.mark.timeout(600)


def _descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for child, parent in parents.items():
            if parent == p and child not in out:
                out.add(child)
                todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def bigger(tmp_path_factory):
    from spg_dist.data.synth import synthesize

    root = tmp_path_factory.mktemp("crash") / "synth_mvtec"
    synthesize(root, layout="mvtec", seed=1, image_size=64, n_train=12, n_test_good=2, n_test_bad=4)
    return root


@pytest.mark.ray
@pytest.mark.slow
def test_killed_driver_loses_one_window_leaves_no_process_and_reruns_exactly(bigger, tmp_path):
    from spg_dist.data.spec import list_records
    from spg_dist.store.check import check

    n = len(list_records(f"mvtec:{bigger}"))
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "spg_dist.cli", "extract", "--dataset", f"mvtec:{bigger}", "--backbone",
           "tiny-dinov3", "--image-size", "64", "--store", str(store), "--num-cpus", "1", "--quiet",
           "--commit-every", "1", "--batch-size", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:  # wait for the first commit
            if (store / "patch_tokens.lance").exists() and Store(store).count("patch_tokens") > 0:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "extraction finished before it could be killed; make the dataset bigger"
        ours = _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    committed = Store(store).count("patch_tokens")
    assert 0 < committed < n  # --commit-every bounds the loss: the rows before the kill are committed
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(p) for p in ours):
        time.sleep(0.5)
    assert not [p for p in ours if _alive(p)], "processes of the killed driver's Ray runtime are still running"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    s = Store(store)
    keys = s.read("patch_tokens", columns=["image_id"]).column("image_id").to_pylist()
    assert len(keys) == len(set(keys)) == n and s.count("images") == n
    report = check(s, repair=True, grace_seconds=0)  # the killed run's uncommitted files are orphans now
    assert not report.not_repaired, report.lines()
    assert all(not t.orphan_files for t in check(s, grace_seconds=0).tables)


def test_truncated_checkpoint_falls_back_to_the_newest_good_one(tmp_path, capsys):
    """Local engine: a run stopped at step 8 (checkpoints at steps 4 and 8); its newest checkpoint is then truncated.
    Continuing the run resumes from step 4 with one line naming the skipped checkpoint, and ends bit-identical to an
    uninterrupted run."""
    import torch
    from test_train_sae import make_token_store

    from spg_dist.ray.train_sae import train_saes
    from spg_dist.sae import TopKSAE
    from spg_dist.store import sae_models

    kw = dict(Cs=[32], ks=[4], batch_tokens=64, checkpoint_every=4, log_every=4, engine="local", dead_tokens=256)
    ref_store = make_token_store(tmp_path / "ref")  # 64 images x 16 tokens: 16 steps per epoch
    ref = train_saes(ref_store, "bb", run_name="run", epochs=1, **kw).models[0]
    store = make_token_store(tmp_path / "s")
    train_saes(store, "bb", run_name="run", epochs=0.5, **kw)  # 8 steps: checkpoints at 4 and 8
    run_dir = Path(store.uri) / "_runs" / "run"
    ckpts = sorted(p.name for p in run_dir.iterdir() if p.name.startswith("checkpoint_"))
    assert len(ckpts) == 2
    newest = run_dir / ckpts[-1] / "sae_000.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    capsys.readouterr()
    resumed = train_saes(store, "bb", run_name="run", epochs=1, **kw).models[0]
    captured = capsys.readouterr()
    out = captured.out + captured.err  # progress lines (the resume) go to stderr
    assert f"skipping damaged checkpoint {ckpts[-1]}" in out and "sae_000.safetensors is truncated" in out
    assert "resumed run from step 4" in out
    a = TopKSAE.from_bytes(sae_models.get(ref_store, ref["sae_id"])["weights"])
    b = TopKSAE.from_bytes(sae_models.get(store, resumed["sae_id"])["weights"])
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


@pytest.mark.ray
def test_tokens_without_images_rows_are_restored_by_a_rerun(ray_cluster, synth_mvtec, tmp_path):
    from spg_dist.data.spec import list_records
    from spg_dist.ray.extract import extract

    store = Store(tmp_path / "s")
    spec = f"mvtec:{synth_mvtec}"
    extract(store, spec, "texture-filterbank", image_size=64, progress=False)
    victim = list_records(spec)[0].image_id
    store.table("images").delete(f"image_id = '{victim}'")  # the gap an older version's crash could leave
    again = extract(store, spec, "texture-filterbank", image_size=64, progress=False)
    assert again.rows_written == 0 and again.images_restored == 1
    row = store.read("images", where=f"image_id = '{victim}'").to_pylist()[0]
    rec = list_records(spec)[0]
    assert row["mask_uri"] == rec.mask_uri and row["width"] > 0
