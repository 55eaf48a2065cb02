"""Paper fidelity at the stage level: maps at the image resolution against full-resolution masks (Eq. 11), the
evaluation resolution recorded in every row, and zero-shot checked against every dataset the SAE and the guides
saw (train-sae refuses an ambiguous store)."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest
from PIL import Image

from spg_dist.data.imageio import load_mask
from spg_dist.errors import CategoryOverlapError
from spg_dist.evaluation.aupro import region_labels
from spg_dist.sae import SAEConfigError
from spg_dist.stages.detect import detect
from spg_dist.stages.guides import train_guides

from test_stage2 import CONFIG, SAE_ID, make_stage2_store, register_sae_with_atoms


def test_small_defects_survive_only_at_image_resolution(tmp_path):
    """A 5x5 and a 7x7 defect in a 900-px mask: two regions of 25 and 49 px natively; at 112 px (4 x a 28-patch
    grid) nearest resizing leaves a pixel or two."""
    mask = np.zeros((900, 900), np.uint8)
    mask[100:105, 100:105] = 255
    mask[500:507, 700:707] = 255
    path = tmp_path / "m.png"
    Image.fromarray(mask).save(path)
    native = load_mask(path)
    _, n_native = region_labels(native[None] > 0)
    assert n_native == 2 and int(native.sum()) == 25 + 49
    small = load_mask(path, 112)
    _, n_small = region_labels(small[None] > 0)
    assert int(small.sum()) <= 2  # 74 defect pixels natively, at most 2 left at 112 px


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    store = make_stage2_store(tmp_path_factory.mktemp("fidelity"))
    register_sae_with_atoms(store)
    return store, train_guides(store, SAE_ID, "aux", CONFIG)


def test_native_resolution_is_recorded_and_uses_full_masks(trained):
    store, g = trained
    native = detect(store, "spg", "tgt", params={"guides": g.guide_id}, resolution="native", run="native")
    square = detect(store, "spg", "tgt", params={"guides": g.guide_id}, run="square")
    rows = store.read("eval_results", columns=["run", "resolution"]).to_pandas()
    assert set(rows[rows.run == "native"].resolution) == {"native"}
    assert set(rows[rows.run == "square"].resolution) == {"16"}  # 4 x the 4x4 grid
    assert native.resolution == "native" and np.isfinite(native.table.to_numpy()).all()
    # the planted masks are 32 px with 8-px cells: at native size every anomalous pixel counts
    assert native.mean["pixel_auroc"] > 0.9 and square.mean["pixel_auroc"] > 0.9
    with pytest.raises(ValueError, match="numeric --resolution"):
        detect(store, "spg", "tgt", params={"guides": g.guide_id}, resolution="native", taus=[0.1])


def test_zero_shot_is_checked_against_what_the_sae_saw(trained, tmp_path):
    """Guides trained on aux only, but their SAE also saw the target: evaluating on it is refused."""
    store, _ = trained
    row = store.read("sae_models").to_pylist()[0]
    config = json.loads(row["config"])
    config["filter"] = {"backbone": "bb", "layer": 3, "dataset": ["aux", "tgt"], "datasets_seen": ["aux", "tgt"]}
    store.upsert("sae_models", [{**row, "sae_id": "bb/L3/saw-target", "config": json.dumps(config),
                                 "created_at": dt.datetime(2026, 1, 2)}])
    g = train_guides(store, "bb/L3/saw-target", "aux", CONFIG)
    with pytest.raises(CategoryOverlapError, match="which the SAE saw"):
        detect(store, "spg", "tgt", params={"guides": g.guide_id})
    ok = detect(store, "spg", "tgt", params={"guides": g.guide_id}, allow_overlap=True, run="leaky")
    assert ok.table.shape[0] == 3


def test_train_sae_refuses_an_ambiguous_store(tmp_path):
    """Without --dataset, a store holding the backbone's tokens of several datasets is refused before any work."""
    from spg_dist.ray.train_sae import train_saes

    store = make_stage2_store(tmp_path)
    with pytest.raises(SAEConfigError, match="pass --aux"):
        train_saes(store, "bb", 3, Cs=[16], ks=[2], batch_tokens=16)
    with pytest.raises(SAEConfigError, match="--run-name"):
        train_saes(store, "bb", 3, Cs=[16], ks=[2], dataset=["aux"], run_name="../../escape")
