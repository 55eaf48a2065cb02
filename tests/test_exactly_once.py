"""Exactly-once writes under concurrent writers: every key once whatever number of processes commit or upsert the
same keys at the same time (spawned processes, as separate jobs would be), three `spg extract` of one dataset
started together, and duplicates an older version left repaired by the next run. The negative control (plain Lance
appends) shows the same workload does duplicate keys without the protocol."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

from spg_dist.store import Store, load_schema, tokens_to_arrow, write_fragment

ROOT = Path(__file__).resolve().parents[1]
WORKERS, ROUNDS = 3, 4
IDS = sorted({f"d/img{(w + r + j) % 12:03d}" for w in range(WORKERS) for r in range(ROUNDS) for j in range(6)})


def _token_rows(ids: list[str], seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = len(ids)
    meta = dict(backbone=["bb"] * n, layer=[1] * n, image_id=ids, dataset=["d"] * n, category=["c"] * n,
                split=["test"] * n, label=[0] * n, image_size=[32] * n)
    return tokens_to_arrow(meta, rng.standard_normal((n, 2, 2, 4)).astype(np.float16), "random-init")


def _writer(uri: str, worker: int, mode: str, barrier) -> None:
    store = Store(uri)
    barrier.wait()  # every process starts its commits at the same moment
    for r in range(ROUNDS):
        ids = [f"d/img{(worker + r + j) % 12:03d}" for j in range(6)]  # heavy overlap between writers and rounds
        rows = _token_rows(ids, seed=worker * 100 + r)
        if mode == "protocol":
            store.commit_fragments("patch_tokens", write_fragment(store.lance_uri("patch_tokens"), rows,
                                                                  load_schema("patch_tokens")))
            store.upsert("images", [dict(image_id=i, dataset="d", category="c", split="test", label=0,
                                         defect_type="good", image_uri=f"/x/{i}.png", mask_uri="", width=32,
                                         height=32) for i in ids])
        else:  # what the store did before: plain appends, which never conflict
            lance.write_dataset(rows, store.lance_uri("patch_tokens"), mode="append")


def _race(uri: str, mode: str) -> None:
    ctx = mp.get_context("spawn")  # never fork after Lance started its runtime
    barrier = ctx.Barrier(WORKERS)
    procs = [ctx.Process(target=_writer, args=(uri, w, mode, barrier)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0


def test_concurrent_commits_and_upserts_keep_every_key_once(tmp_path):
    store = Store(tmp_path / "s")
    store.table("patch_tokens"), store.table("images")  # created before the race
    _race(store.uri, "protocol")
    keys = store.read("patch_tokens", columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(keys) == IDS  # every id of the workload, once
    ids = store.read("images", columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(ids) == IDS


def test_plain_appends_duplicate_the_same_workload(tmp_path):
    """The negative control: the same race with plain appends leaves keys several times (so the test above can
    fail), and `Store.dedupe` (what `spg store check --repair` and a re-run do) repairs it."""
    store = Store(tmp_path / "s")
    store.table("patch_tokens")
    _race(store.uri, "plain")
    keys = store.read("patch_tokens", columns=["image_id"]).column("image_id").to_pylist()
    assert len(keys) == WORKERS * ROUNDS * 6 > len(set(keys)) == len(IDS)
    assert store.dedupe("patch_tokens") == len(keys) - len(IDS)
    keys = store.read("patch_tokens", columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(keys) == IDS


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_three_extractions_of_one_dataset_at_once(synth_mvtec, tmp_path):
    """Three `spg extract` of one dataset started together into one store (three local Ray runtimes)."""
    from spg_dist.data.spec import list_records

    store = tmp_path / "store"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "spg_dist.cli", "extract", "--dataset", f"mvtec:{synth_mvtec}", "--backbone",
           "texture-filterbank", "--image-size", "64", "--store", str(store), "--num-cpus", "1", "--quiet",
           "--commit-every", "1", "--batch-size", "4"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(3)]
    try:
        outs = [p.communicate(timeout=500)[0] for p in procs]
    finally:
        for p in procs:  # only what this test started
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    n = len(list_records(f"mvtec:{synth_mvtec}"))
    s = Store(store)
    keys = s.read("patch_tokens", columns=["image_id"]).column("image_id").to_pylist()
    assert len(keys) == len(set(keys)) == n
    assert s.count("images") == n
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and f"0 patch_tokens rows written, {n} images already stored" in again.stdout


@pytest.mark.ray
def test_a_rerun_repairs_duplicates_an_older_version_left(ray_cluster, synth_mvtec, tmp_path):
    from spg_dist.data.spec import list_records
    from spg_dist.ray.extract import extract

    store = Store(tmp_path / "s")
    spec = f"mvtec:{synth_mvtec}"
    first = extract(store, spec, "texture-filterbank", image_size=64, progress=False)
    rows = store.read("patch_tokens").slice(0, 5)
    lance.write_dataset(rows, store.lance_uri("patch_tokens"), mode="append")  # an old plain-append duplicate
    assert store.count("patch_tokens") == first.rows_written + 5
    again = extract(store, spec, "texture-filterbank", image_size=64, progress=False)
    assert again.duplicates_removed == 5 and again.rows_written == 0
    assert store.count("patch_tokens") == len(list_records(spec))
