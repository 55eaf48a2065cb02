"""The evaluation loop's reports (`detect(..., report_dir=, overlays=, taus=)`, `spg evaluate --report/--overlays/--taus`): metrics CSV and
Markdown equal to the returned table, valid overlay PNGs (anomalous images first), a τ sweep of lse pooling computed
from the stored maps whose tiny-τ end is max pooling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_stage2 import (CONFIG, SAE_ID, make_stage2_store,  # noqa: F401  (reuse the stage-2 store builder)
                         register_sae_with_atoms)

from spg_dist.stages.detect import detect
from spg_dist.stages.guides import train_guides
from spg_dist.evaluation import METRICS, image_auroc
from spg_dist.viz.overlays import overlay_names, pick_overlay_indices
from spg_dist.viz.sweeps import parse_taus, pooled_scores, tau_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TAUS = [1e-7, 0.01, 0.05, 0.1, 0.5]


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reports")
    store = make_stage2_store(tmp)
    register_sae_with_atoms(store)
    row = train_guides(store, SAE_ID, "aux", CONFIG).row
    # give one target image a real picture; the others point at missing files (drawn as a grey placeholder)
    img = tmp / "t0_bad_004.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(img)
    images = store.read("images").to_pylist()
    for r in images:
        if r["image_id"] == "tgt/t0/test/bad/004":
            r["image_uri"] = str(img)
    store.upsert("images", images)
    out = tmp / "report"
    res = detect(store, "spg", "tgt", params={"guides": row["guide_id"]}, report_dir=out, overlays=3, taus=TAUS)
    return store, row, res, out


def evaluate(store, guide_id, target, **kw):
    return detect(store, "spg", target, params={"guides": guide_id}, **kw)


def _is_png(path, min_bytes=5000):
    data = open(path, "rb").read()
    return data[:8] == PNG_MAGIC and len(data) > min_bytes


def test_metrics_csv_and_markdown(reported):
    _, _, res, out = reported
    df = res.table
    assert list(df.index) == ["t0", "t1", "mean"]
    csv = pd.read_csv(out / "metrics.csv", index_col="category")
    assert list(csv.index) == ["t0", "t1", "mean"] and list(csv.columns) == list(METRICS)
    np.testing.assert_allclose(csv.to_numpy(), df.to_numpy(), rtol=0, atol=1e-12)
    md = (out / "metrics.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + 3 and rows[-1].startswith("| mean")
    assert all(m in rows[0] for m in METRICS)
    assert f"{df.loc['t0', 'image_auroc']:.4f}" in rows[2]
    assert res.report["metrics_csv"] == str(out / "metrics.csv")


def test_overlay_pngs(reported):
    _, _, res, out = reported
    pngs = sorted((out / "overlays").glob("*.png"))
    # 3 per category, anomalous first: target images 4..7 are anomalous -> 004, 005, 006
    assert [p.name for p in pngs] == [f"{c}__{i:03d}.png" for c in ("t0", "t1") for i in (4, 5, 6)]
    assert sorted(res.report["overlays"]) == [str(p) for p in pngs]
    for p in pngs:
        assert _is_png(p), p
    # the one with a real picture draws it (more bytes than a grey placeholder of the same layout)
    assert (out / "overlays" / "t0__004.png").stat().st_size > (out / "overlays" / "t0__005.png").stat().st_size


def test_tau_sweep(reported):
    _, _, res, out = reported
    df = res.table
    sweep = pd.read_csv(out / "tau_sweep.csv")
    assert len(sweep) == len(TAUS) and list(sweep["tau"]) == pytest.approx(TAUS)
    assert sweep.to_dict("records")[0]["pooling"] == res.tau_sweep.iloc[0]["pooling"]
    assert list(res.tau_sweep["tau"]) == TAUS
    # max pooling is the evaluation's own pooling here: its reference equals the returned table's image metrics
    for m in ("image_auroc", "image_ap"):
        assert sweep[f"max_{m}"].iloc[0] == pytest.approx(df.loc["mean", m], abs=1e-9)
        np.testing.assert_allclose(sweep[m], sweep[[f"t0/{m}", f"t1/{m}"]].mean(axis=1))
    # τ -> 0: lse pooling ranks like max pooling
    assert sweep["image_auroc"].iloc[0] == pytest.approx(sweep["max_image_auroc"].iloc[0], abs=1e-6)
    assert sweep["image_ap"].iloc[0] == pytest.approx(sweep["max_image_ap"].iloc[0], abs=1e-6)
    assert _is_png(out / "tau_sweep.png")


def test_tau_sweep_hand_known():
    """Two images: the anomalous one has the higher max but the lower mean -> AUROC 1 at tiny τ, 0 at large τ."""
    bad = np.zeros((4, 4)); bad[0, 0] = 1.0           # max 1, mean 1/16
    good = np.full((4, 4), 0.5)                       # max 0.5, mean 0.5
    maps, labels = np.stack([bad, good]), np.array([1, 0])
    s = tau_sweep({"c": (labels, maps)}, [1e-6, 100.0])
    assert list(s["image_auroc"]) == [1.0, 0.0] and list(s["max_image_auroc"]) == [1.0, 1.0]
    np.testing.assert_allclose(pooled_scores(maps, "lse:1e-6"), [1.0 - 1e-6 * np.log(16), 0.5], atol=1e-9)
    assert image_auroc(labels, pooled_scores(maps, "max")) == 1.0


def test_helpers():
    assert parse_taus("0.5, 0.01,0.05,0.01") == [0.01, 0.05, 0.5] and parse_taus(None) is None and parse_taus("") is None
    with pytest.raises(ValueError):
        parse_taus("0.1,-1")
    with pytest.raises(ValueError):
        parse_taus("0.1,abc")
    assert pick_overlay_indices([0, 1, 0, 1, 0], 3) == [1, 3, 0] and pick_overlay_indices([0, 1], 0) == []
    assert overlay_names(["d/c/test/good/000.png", "d/c/test/crack/000.png"]) == ["good_000", "crack_000"]


def test_no_report_no_files(reported, tmp_path):
    store, row, _, _ = reported
    res = evaluate(store, row["guide_id"], "tgt", run="plain")
    assert res.report is None and res.tau_sweep is None
    with pytest.raises(ValueError):
        evaluate(store, row["guide_id"], "tgt", taus=[0.0])


def test_cli_report_and_taus(reported, tmp_path):
    from click.testing import CliRunner

    from spg_dist.cli import main

    store, row, _, _ = reported
    out = tmp_path / "cli_report"
    r = CliRunner().invoke(main, ["evaluate", "--store", store.uri, "--guides", row["guide_id"], "--target", "tgt",
                                  "--run", "cli-report", "--report", str(out), "--overlays", "1",
                                  "--taus", "0.01,0.05,0.1,0.5"])
    assert r.exit_code == 0, r.output
    for name in ("metrics.csv", "metrics.md", "tau_sweep.csv", "tau_sweep.png"):
        assert (out / name).is_file() and str(out / name) in r.output
    assert len(list((out / "overlays").glob("*.png"))) == 2 and "2 overlays" in r.output
    assert len(pd.read_csv(out / "tau_sweep.csv")) == 4 and "τ=0.01" in r.output
    r = CliRunner().invoke(main, ["evaluate", "--store", store.uri, "--guides", row["guide_id"], "--target", "tgt",
                                  "--taus", "0.1,zero"])
    assert r.exit_code == 2 and "--taus" in r.output
