"""bench/capacity.py: known answers of the capacity planner (tokens, FLOPs, the H200 step model, the sweep's
shared-work saving on a hand-counted 2x2 grid) and its --json output."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "capacity.py"


@pytest.fixture(scope="module")
def cap():
    spec = importlib.util.spec_from_file_location("bench_capacity", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def test_tokens_per_image_and_dataset(cap):
    assert cap.tokens_per_image("dinov3-vitl16") == 784  # ViT/16 at 448: 28 x 28
    assert cap.tokens_per_image("dinov2-vitl14") == 32 * 32
    assert cap.tokens_per_image("siglip-l16-384") == 24 * 24
    assert cap.tokens_per_image("openclip-vitl14-336") == 37 * 37
    t = cap.tokens_per_dataset("dinov3-vitl16")
    assert t["mvtec"] == (3629 + 1725) * 784
    assert t["visa"] == (9621 + 1200) * 784 == (8659 + 2162) * 784
    assert t["total"] == 16175 * 784 == 12_681_200  # README (bench/capacity.py): "12.68 M tokens"
    assert cap.tokens_per_dataset("dinov3-vitl16", "train")["visa"] == 8659 * 784


def test_store_bytes_by_hand(cap):
    b = cap.store_bytes(1000, 1024, 32, C=4096)
    assert b["patch_tokens"] == pytest.approx(1000 * 1024 * 2 * 1.017)
    assert b["activations"] == 1000 * 32 == 32000
    assert b["sae_codes"] == pytest.approx(1000 * 32 * 5.496)  # bench/atoms.py, bytes per activation
    assert b["atoms"] == pytest.approx(1000 * 32 * 4.421)  # atom_images + atom_top, data + indexes
    assert "atom_index" not in b
    assert b["sae_weights"] == (2 * 4096 * 1024 + 4096 + 1024) * 4


def test_step_model_reproduces_h200_figures(cap):
    for C, rate in cap.H200_DENSE_STEP:
        got = 1.0 / cap.step_seconds(C, 1)
        assert abs(got / rate - 1) < 0.10, (C, got, rate)
    assert cap.step_seconds(4096, 2_000) == pytest.approx(2 * cap.step_seconds(4096, 1_000))


def test_sae_flops_tiny_case_by_hand(cap):
    f = cap.sae_flops(2, 3, 4, 1)
    assert f["encoder"] == 2 * 2 * 3 * 4  # 48
    assert f["select"] == 2 * 4  # 8
    assert f["decoder"] == 2 * 2 * 1 * 3  # 12
    assert f["loss"] == 3 * 2 * 3  # 18
    assert f["backward"] == 8 * 2 * 1 * 3  # 48: grad values + grad W_dec rows + grad W_enc rows + grad x
    assert f["auxk"] == f["auxk_select"] == f["optimizer"] == 0
    assert f["total"] == 134
    g = cap.sae_flops(2, 3, 4, 1, k_aux=2, batch_tokens=2)
    assert g["auxk_select"] == 8 and g["auxk"] == 10 * 2 * 2 * 3
    assert g["optimizer"] == 10 * (2 * 4 * 3 + 4 + 3)  # one step
    assert g["total"] == 134 + 8 + 120 + 310
    assert cap.dense_sae_flops(2, 3, 4) == 12 * 2 * 3 * 4


def test_shared_saving_hand_counted_2x2(cap):
    costs = cap.CostModel(auxk=False, step_model=(1e-9, 0.0), guide_steps=1000, guide_step_floor_s=1e-3)
    grid = cap.Grid(directions=(("visa", "mvtec"),), Cs=(2048, 4096), ks=(8, 16), epochs=1)
    p = cap.plan(grid, gpus=(1, 2), costs=costs)
    N = 10821 * 784
    E = (5354 + 10821) / 400.0  # both datasets at the measured 400 img/s
    L = N * 1024 * 2 / 0.44e9
    S = N * 1e-9
    G = 1.0  # 1000 steps at the 1 ms floor
    alone = 4 * (E + L + S + G)
    shared = E + 2 * L + 4 * S + 4 * G  # one extraction, one pass per C, every SAE and guide pair
    assert p["alone_s"]["total"] == pytest.approx(alone)
    assert p["shared_s"]["total"] == pytest.approx(shared)
    assert p["ratio"] == pytest.approx(alone / shared) and p["ratio"] >= 1
    assert p["counts"]["alone"] == {"extractions": 8, "passes": 4, "saes": 4, "guides": 4}
    assert p["counts"]["shared"] == {"extractions": 2, "passes": 2, "saes": 4, "guides": 4}
    # two GPUs: four equal trials -> two each; shared: extraction split, one pass per GPU
    assert p["wall"]["2"]["alone_s"] == pytest.approx(2 * (E + L + S + G))
    assert p["wall"]["2"]["shared_s"] == pytest.approx(E / 2 + L + 2 * S + 2 * G)
    # guide variants: alone repeats everything per variant, shared only the guides
    p3 = cap.plan(replace(grid, guide_settings=3), gpus=(1,), costs=costs)
    assert p3["alone_s"]["total"] == pytest.approx(3 * alone)
    assert p3["shared_s"]["total"] == pytest.approx(shared + 8 * G)


def test_default_grid_saving_at_least_one(cap):
    p = cap.plan()
    assert p["trials"] == 50 and p["ratio"] >= 1
    assert all(w["ratio"] >= 1 for w in p["wall"].values())


def test_main_json(cap, capsys):
    assert cap.main(["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tokens"]["dinov3-vitl16"]["total"] == 12_681_200
    assert set(doc["sweep"]) == {"1", "8"}
    assert doc["sweep"]["1"]["ratio"] >= 1


def test_main_tables(cap, capsys):
    assert cap.main([]) == 0
    out = capsys.readouterr().out
    for section in ("[tokens]", "[store]", "[sae]", "[extract]", "[sweep]"):
        assert section in out
    assert "measured on one H200" in out and "from FLOPs at" in out
