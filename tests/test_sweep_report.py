"""Sweep report (spg_dist.viz.sweep_report): summary numbers checked by hand, figures written and readable,
heatmap cells equal to the hand-computed means, skipped figures reported, empty input refused."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spg_dist.viz import sweep_report as sr

D1 = "synth_visa -> synth_mvtec"
D2 = "synth_mvtec -> synth_visa"
RELU = "relu β=0.01"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
POOL_BONUS = {"max": 0.0, "lse:0.01": 0.01, "lse:0.1": -0.02}


def _value(direction, backbone, C, k, guide, pooling, seed, metric_idx):
    """Metrics (fractions) with known structure, so the means below can be worked out by hand."""
    v = 0.60 + 0.10 * (C == 128) + 0.05 * (k == 8) + POOL_BONUS[pooling] + 0.03 * seed + 0.01 * metric_idx
    v -= 0.10 * (direction == D2)
    v -= 0.05 * (backbone == "clip")
    v += {"topk k_g=16": -0.04, "topk k_g=64": 0.02}.get(guide, 0.0)
    return v


def _row(direction, backbone, C, k, guide, pooling, seed, active_total):
    nonneg, k_g, beta = ("topk", int(guide.split("=")[1]), math.nan) if guide.startswith("topk") else ("relu", math.nan, 0.01)
    tau = float(pooling[4:]) if pooling.startswith("lse:") else 0.0
    r = dict(trial_id=f"{direction}|{backbone}|{C}|{k}|{guide}|{pooling}|{seed}", detector="spg", backbone=backbone,
             token="block", layer=24, C=C, k=k, sparsifier="topk", guide=guide, nonneg=nonneg, k_g=k_g, beta_l1=beta,
             pooling=pooling, tau=tau, direction=direction, seed=seed, active_total=active_total)
    for i, m in enumerate(sr.METRICS):
        r[m] = _value(direction, backbone, C, k, guide, pooling, seed, i)
    return r


def trials() -> pd.DataFrame:
    rows = []
    for d in (D1, D2):
        for seed in (0, 1):
            for C in (64, 128):
                for k in (4, 8):
                    for pooling in ("max", "lse:0.01", "lse:0.1"):
                        rows.append(_row(d, "dinov3", C, k, RELU, pooling, seed, 200 + 10 * seed))
            # the guide-sparsity variant: TopK guides at one (C, k), max pooling
            for kg in (16, 64):
                rows.append(_row(d, "dinov3", 128, 8, f"topk k_g={kg}", "max", seed, 2 * kg))
            # a second backbone at one (C, k)
            rows.append(_row(d, "clip", 64, 4, RELU, "max", seed, 300))
        # a non-SPG detector, one seed
        rows.append(dict(trial_id=f"{d}|knn", detector="knn", backbone="dinov3", token="block", layer=24, C=math.nan,
                         k=math.nan, sparsifier="", guide="", nonneg="", k_g=math.nan, beta_l1=math.nan,
                         pooling="top:1%", tau=math.nan, direction=d, seed=0, active_total=math.nan,
                         image_auroc=0.9, image_ap=0.95, pixel_auroc=0.97, aupro=math.nan))
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def df() -> pd.DataFrame:
    return trials()


def test_summary_cell_by_hand(df):
    s = sr.summary_table(df)
    assert list(s.index.names) == list(sr.GROUP_KEYS)
    r = s.loc[(D1, "spg", "dinov3", 128, 8, RELU, "max")]
    # seeds: 0.60 + 0.10 + 0.05 = 0.75 and 0.78 -> mean 0.765, sample std 0.03 / sqrt 2
    assert r["n_seeds"] == 2
    assert r["image_auroc"] == pytest.approx(0.765)
    assert r["image_auroc_std"] == pytest.approx(0.03 / math.sqrt(2))
    assert r["aupro"] == pytest.approx(0.795)  # + 0.01 * 3
    flat = s.reset_index()
    knn = flat[(flat["direction"] == D1) & (flat["detector"] == "knn")].iloc[0]
    assert pd.isna(knn["C"]) and pd.isna(knn["k"]) and knn["guide"] == "" and knn["pooling"] == "top:1%"
    assert knn["n_seeds"] == 1 and knn["image_auroc"] == pytest.approx(0.9)
    assert np.isnan(knn["image_auroc_std"]) and np.isnan(knn["aupro"])
    # every column numeric: what to_csv and evaluate.markdown_table's fallback need
    assert all(pd.api.types.is_numeric_dtype(s[c]) for c in s.columns)
    md = sr.summary_markdown(s)
    assert "76.5 ± 2.1" in md and "| synth_visa -> synth_mvtec | knn | dinov3 | – | – | – | top:1% | 1 | 90.0 |" in md


def test_summary_adds_keys_that_vary(df):
    d = df.copy()
    d.loc[d.index[:3], "layer"] = 12
    assert "layer" in sr.summary_table(d).index.names
    assert "layer" not in sr.summary_table(df).index.names


def test_ck_matrix_equals_hand_means_and_is_what_is_drawn(df):
    mat = sr.ck_matrix(df, D1, "image_auroc")
    # max pooling, guide relu β=0.01 (covers all 4 cells), backbone dinov3; mean over seeds adds 0.015
    expected = pd.DataFrame([[0.615, 0.665], [0.715, 0.765]], index=pd.Index([64, 128], name="C"),
                            columns=pd.Index([4, 8], name="k"))
    pd.testing.assert_frame_equal(mat, expected)
    assert sr.ck_matrix(df, D2, "aupro").loc[128, 8] == pytest.approx(0.765 - 0.10 + 0.03)

    fig = sr.ck_heatmap_figure(df, D1)
    ax = next(a for a in fig.axes if a.get_title() == "image AUROC")
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), expected.to_numpy() * 100)
    assert {t.get_text() for t in ax.texts} == {"61.5", "66.5", "71.5", "76.5"}
    assert ax.get_xlabel() and ax.get_ylabel()
    assert any("image AUROC (%)" == a.get_ylabel() for a in fig.axes)  # the labelled colorbar
    assert "guide relu β=0.01 (most common of 3)" in fig.get_suptitle()


def test_points_behind_the_other_figures(df):
    curve, ref, _ = sr.tau_points(df, D1)
    assert list(curve.index) == [0.01, 0.1]
    # most covered (C, k) for the τ curve: all four cover both τ -> ties broken by order -> C=64, k=4
    assert curve.loc[0.01, "image_auroc"] == pytest.approx(0.60 + 0.01 + 0.015)
    assert ref["image_auroc"] == pytest.approx(0.615)

    bb, notes = sr.backbone_table(df, D1)
    assert list(bb.index) == ["clip", "dinov3"]
    assert bb.loc["clip", "image_auroc"] == pytest.approx(0.565)
    assert bb.loc["dinov3", "image_auroc"] == pytest.approx(0.615)
    assert any("C=64" in n for n in notes)

    pts, _ = sr.sparsity_points(df, D1)
    assert list(pts["kind"]) == ["relu", "topk", "topk"]
    assert list(pts["active_total"]) == [205.0, 32.0, 128.0]
    assert pts.loc[pts["guide"] == "topk k_g=64", "image_auroc"].item() == pytest.approx(0.785)


def test_write_report_writes_every_figure(df, tmp_path):
    res = sr.write_report(df, tmp_path / "report", "test sweep")
    assert res["skipped"] == {}
    assert Path(res["summary_csv"]).exists()
    back = pd.read_csv(res["summary_csv"])
    assert len(back) == len(sr.summary_table(df))
    assert Path(res["summary_md"]).read_text(encoding="utf-8").startswith("# test sweep")
    pngs = [p for ps in res["figures"].values() for p in ps]
    assert {k: len(v) for k, v in res["figures"].items()} == {"ck_heatmaps": 2, "tau_curve": 1, "backbone_bars": 1,
                                                             "sparsity_curve": 2}
    for p in pngs:
        data = Path(p).read_bytes()
        assert data[:8] == PNG_MAGIC, p
        assert len(data) > 5000, (p, len(data))


def test_skipped_figures_are_reported(df, tmp_path):
    one = df[(df["pooling"] != "lse:0.01") & (df["backbone"] == "dinov3") & ~df["guide"].str.startswith("topk")]
    one = one[(one["C"] == 64) | one["C"].isna()]
    one = one[(one["k"] == 4) | one["k"].isna()]
    res = sr.write_report(one, tmp_path / "r1", "one of each")
    assert set(res["skipped"]) == {"ck_heatmaps", "tau_curve", "backbone_bars", "sparsity_curve"}
    assert all(res["figures"][name] == [] for name in res["skipped"])
    assert any("τ" in n and D1 in n for n in res["skipped"]["tau_curve"])
    assert len(res["skipped"]["tau_curve"]) == 2  # one note per direction
    assert Path(res["summary_md"]).exists()
    # only one direction lacking: the other still drawn
    part = df[~((df["direction"] == D2) & (df["pooling"] == "lse:0.1"))]
    notes: list[str] = []
    assert len(sr.tau_curve(part, tmp_path / "r2", notes=notes)) == 1
    assert len(notes) == 1 and D2 in notes[0]


def test_missing_column_in_write_report_is_a_note(df, tmp_path):
    res = sr.write_report(df[df["direction"] == D1].drop(columns=["active_total"]), tmp_path / "r3", "no sparsity")
    assert "active_total" in res["skipped"]["sparsity_curve"][0]
    assert len(res["figures"]["ck_heatmaps"]) == 1


def test_empty_or_incomplete_input_is_refused(df, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        sr.write_report(df.iloc[:0], tmp_path / "e", "empty")
    with pytest.raises(ValueError, match="empty"):
        sr.summary_table(pd.DataFrame())
    with pytest.raises(ValueError, match="seed"):
        sr.summary_table(df.drop(columns=["seed"]))
    with pytest.raises(ValueError, match="None"):
        sr.ck_heatmaps(None, tmp_path)


def test_metrics_match_evaluation_and_module_stays_pure():
    from spg_dist.evaluation.metrics import METRICS

    assert sr.METRICS == METRICS
    src = Path(sr.__file__).read_text(encoding="utf-8")
    assert "spg_dist.store" not in src and "import ray" not in src and "pyplot" not in src
