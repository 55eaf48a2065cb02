"""Metrics: hand-computed cases, a slow obviously-correct reference, sklearn, and anomalib 2.7 where it installs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from skimage.measure import label as sk_label
from sklearn.metrics import average_precision_score, roc_auc_score

from spg_dist.evaluation import (
    aupro,
    evaluate_category,
    image_ap,
    image_auroc,
    mean_over_categories,
    pixel_auroc,
)


def slow_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Reference: loop over every distinct threshold and every region (8-connected per image), MVTec style."""
    regions = []
    for i in range(masks.shape[0]):
        lab = sk_label(masks[i].astype(np.uint8), connectivity=2)  # independent CC implementation
        regions += [(i, lab == r) for r in range(1, lab.max() + 1)]
    maps = maps.astype(np.float32)
    bg = maps[~masks.astype(bool)]
    fpr, pro = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fpr.append(float(np.mean(bg >= t)))
        pro.append(float(np.mean([np.mean(maps[i][r] >= t) for i, r in regions])))
    fpr, pro = np.array(fpr), np.array(pro)
    lim = float(np.float32(fpr_limit))
    i = np.nonzero(fpr <= lim)[0][-1]
    if fpr[i] < lim and i + 1 < fpr.size:
        p = pro[i] + (pro[i + 1] - pro[i]) * (lim - fpr[i]) / (fpr[i + 1] - fpr[i])
        fpr, pro = np.r_[fpr[: i + 1], lim], np.r_[pro[: i + 1], p]
    else:
        fpr, pro = fpr[: i + 1], pro[: i + 1]
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
    return float(trapezoid(pro, fpr) / fpr[-1])


def random_case(rng: np.random.Generator, quantise: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Small stack with random, often touching, regions; quantised maps create ties between normal and anomalous."""
    n, h, w = int(rng.integers(1, 5)), int(rng.integers(4, 14)), int(rng.integers(4, 14))
    masks = rng.random((n, h, w)) < rng.uniform(0.05, 0.35)
    masks[0, 0, 0], masks[0, -1, -1] = True, False  # both classes present
    maps = rng.random((n, h, w)) + masks * rng.uniform(0, 1)
    if quantise:
        maps = np.round(maps * quantise) / quantise
    return masks, maps.astype(np.float32)


# Seeded inputs whose AUPRO anomalib 2.7 computed once (tests/fixtures/aupro_golden.json, made by
# tests/fixtures/make_aupro_golden.py): kept here, frozen, so the golden values hold whatever random_case becomes.
GOLDEN_CASES = ([{"kind": "random", "seed": s, "quantise": [None, 10, 40, 6][s % 4], "fpr_limit": [0.3, 0.05, 0.6][s % 3]}
                 for s in range(300, 316)]
                + [{"kind": "blobs", "seed": s, "quantise": [None, 20][s % 2], "fpr_limit": 0.3} for s in range(400, 404)])
GOLDEN = Path(__file__).resolve().parent / "fixtures" / "aupro_golden.json"


def golden_case(kind: str, seed: int, quantise: int | None, fpr_limit: float) -> tuple[np.ndarray, np.ndarray]:
    """``random``: small stacks of scattered, often touching pixels; ``blobs``: 6 x 40 x 48 maps of smooth noise with
    blob-shaped regions (several per image, the shape of real defects). ``fpr_limit`` is not used here."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    if kind == "random":
        n, h, w = int(rng.integers(1, 5)), int(rng.integers(4, 14)), int(rng.integers(4, 14))
        masks = rng.random((n, h, w)) < rng.uniform(0.05, 0.35)
        maps = rng.random((n, h, w)) + masks * rng.uniform(0, 1)
    else:
        n, h, w = 6, 40, 48
        field = gaussian_filter(rng.standard_normal((n, h, w)), sigma=(0, 3, 3))
        masks = field > np.quantile(field, 0.9)
        maps = gaussian_filter(rng.standard_normal((n, h, w)), sigma=(0, 2, 2)) + 0.6 * gaussian_filter(
            masks.astype(float), sigma=(0, 1.5, 1.5))
    masks[0, 0, 0], masks[0, -1, -1] = True, False  # both classes present
    if quantise:
        maps = np.round(maps * quantise) / quantise
    return masks, maps.astype(np.float32)


def test_aupro_matches_anomalib_golden() -> None:
    """Every CI run, anomalib or not: our AUPRO against anomalib 2.7's on the same seeded inputs (values stored)."""
    golden = json.loads(GOLDEN.read_text())
    assert golden["anomalib_version"].startswith("2.7") and len(golden["cases"]) == len(GOLDEN_CASES)
    for spec, case in zip(GOLDEN_CASES, golden["cases"]):
        assert {k: case[k] for k in spec} == spec, "regenerate tests/fixtures/aupro_golden.json"
        masks, maps = golden_case(**spec)
        assert list(masks.shape) == case["shape"]
        assert aupro(masks, maps, fpr_limit=spec["fpr_limit"]) == pytest.approx(case["aupro"], abs=1e-6), spec


@pytest.mark.parametrize("index", range(len(GOLDEN_CASES)))
def test_golden_inputs_against_live_anomalib(index: int) -> None:
    """Where anomalib installs, the stored values are still what it computes (catches a stale fixture)."""
    pytest.importorskip("anomalib")
    torch = pytest.importorskip("torch")
    from anomalib.metrics.aupro import _AUPRO

    spec = GOLDEN_CASES[index]
    masks, maps = golden_case(**spec)
    metric = _AUPRO(fpr_limit=spec["fpr_limit"])
    metric.update(torch.from_numpy(maps), torch.from_numpy(masks.astype(np.float32)))
    assert float(metric.compute()) == pytest.approx(json.loads(GOLDEN.read_text())["cases"][index]["aupro"], abs=1e-7)
    assert aupro(masks, maps, fpr_limit=spec["fpr_limit"]) == pytest.approx(float(metric.compute()), abs=1e-6)


# ---------------------------------------------------------------------------------------------- image / pixel AUROC
def test_auroc_ap_perfect_and_reversed() -> None:
    y = np.array([0, 0, 1, 1])
    assert image_auroc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_auroc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert image_ap(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_auroc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5  # all tied: chance
    masks = np.zeros((1, 2, 2), bool)
    masks[0, 0, 0] = True
    assert pixel_auroc(masks, np.array([[[1.0, 0.0], [0.0, 0.0]]])) == 1.0
    assert pixel_auroc(masks, np.array([[[0.0, 1.0], [1.0, 1.0]]])) == 0.0
    assert pixel_auroc(masks, np.array([[[0.5, 0.5], [0.0, 0.9]]])) == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3


@pytest.mark.parametrize("seed", range(6))
def test_against_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks, maps = random_case(rng, quantise=[None, 8, 50][seed % 3])
    assert abs(pixel_auroc(masks, maps) - roc_auc_score(masks.ravel(), maps.ravel())) < 1e-9
    y = rng.random(30) < 0.5
    y[:2] = [True, False]
    s = np.round(rng.random(30) + y * 0.3, 1)
    assert image_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert image_ap(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


# ------------------------------------------------------------------------------------------------------------ AUPRO
def test_aupro_hand_computed_1x4x4() -> None:
    # One region of 2 pixels (scores 0.9, 0.5); 14 normal pixels: one at 0.7, the rest <= 0.4 (all distinct).
    # Curve: (0,0) -> t=.9 (0, 1/2) -> t=.7 (1/14, 1/2) -> t=.5 (1/14, 1) -> then PRO stays 1.
    # Area on [0, 0.3] = (1/14)(1/2) + (0.3 - 1/14)(1) = 0.3 - 1/28; divided by 0.3: 1 - 1/8.4 = 37/42.
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0, :2] = True
    maps = np.array([[[0.9, 0.5, 0.7, 0.40], [0.39, 0.38, 0.37, 0.36], [0.35, 0.34, 0.33, 0.32], [0.31, 0.3, 0.29, 0.28]]])
    assert aupro(masks, maps) == pytest.approx(37 / 42, abs=1e-6)
    assert aupro(masks, maps) == pytest.approx(slow_aupro(masks, maps), abs=1e-9)


def test_aupro_averages_per_region_not_per_pixel() -> None:
    # Region A = 1 pixel ranked first, region B = 3 pixels ranked below every normal pixel. From FPR 0 on, A is fully
    # found and B not at all: PRO = (1 + 0) / 2 = 0.5 (a per-pixel overlap would give 1/4), so AUPRO = 0.5.
    masks = np.zeros((1, 5, 5), bool)
    masks[0, 0, 0] = True
    masks[0, 4, 2:5] = True
    maps = np.full((1, 5, 5), 0.5)
    maps[0, 0, 0], maps[0, 4, 2:5] = 1.0, 0.0
    maps[0, 1:4] += np.linspace(0, 0.1, 15).reshape(3, 5)  # distinct normal scores
    assert aupro(masks, maps) == pytest.approx(0.5, abs=1e-6)


def test_aupro_uses_8_connectivity() -> None:
    # (0,0) and (1,1) touch diagonally: one region of 2 under 8-connectivity (anomalib/cv2), two under 4.
    # With (0,0) ranked first and the others last, PRO = (1/2 + 0) / 2 = 0.25 (it would be 1/3 with 4-connectivity).
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 3, 3] = True
    maps = np.full((1, 4, 4), 0.5)
    maps[0, 0, 0], maps[0, 1, 1], maps[0, 3, 3] = 1.0, 0.0, 0.0
    assert aupro(masks, maps) == pytest.approx(0.25, abs=1e-6)


def test_aupro_regions_do_not_span_images() -> None:
    # The same pixel anomalous in two images is two regions, not one 3-D blob.
    masks = np.zeros((2, 3, 3), bool)
    masks[:, 1, 1] = True
    maps = np.full((2, 3, 3), 0.5)
    maps[0, 1, 1], maps[1, 1, 1] = 1.0, 0.0
    assert aupro(masks, maps) == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("seed", range(12))
def test_aupro_equals_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    masks, maps = random_case(rng, quantise=[None, 6, 40][seed % 3])
    limit = [0.3, 0.05, 0.6, 1.0][seed % 4]
    assert aupro(masks, maps, limit) == pytest.approx(slow_aupro(masks, maps, limit), abs=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_aupro_equals_anomalib(seed: int) -> None:
    pytest.importorskip("anomalib")
    torch = pytest.importorskip("torch")
    from anomalib.metrics.aupro import _AUPRO

    rng = np.random.default_rng(200 + seed)
    masks, maps = random_case(rng, quantise=[None, 10][seed % 2])
    metric = _AUPRO(fpr_limit=0.3)
    metric.update(torch.from_numpy(maps), torch.from_numpy(masks.astype(np.float32)))
    assert aupro(masks, maps) == pytest.approx(float(metric.compute()), abs=1e-4)


# ------------------------------------------------------------------------------------------------------- degenerate
def test_degenerate_inputs_give_nan_with_warning() -> None:
    normal = np.zeros((2, 4, 4), bool)
    maps = np.random.default_rng(0).random((2, 4, 4))
    with pytest.warns(RuntimeWarning, match="only normal"):
        assert np.isnan(image_auroc([0, 0], [0.1, 0.2]))
    with pytest.warns(RuntimeWarning, match="only anomalous"):
        assert np.isnan(image_ap([1, 1], [0.1, 0.2]))
    with pytest.warns(RuntimeWarning):
        assert np.isnan(pixel_auroc(normal, maps))
    with pytest.warns(RuntimeWarning, match="no anomalous pixel"):
        assert np.isnan(aupro(normal, maps))
    with pytest.warns(RuntimeWarning, match="no normal pixel"):
        assert np.isnan(aupro(~normal, maps))


def test_invalid_inputs_raise() -> None:
    masks = np.zeros((1, 4, 4), np.uint8)
    masks[0, 0, 0] = 255
    with pytest.raises(ValueError, match="binary"):
        aupro(masks, np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="shape|\\[N, H, W\\]"):
        aupro(masks[:, :2] > 0, np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(masks > 0, np.full((1, 4, 4), np.nan))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks > 0, np.zeros((1, 4, 4)), fpr_limit=0.0)


def test_evaluate_category_and_mean() -> None:
    rng = np.random.default_rng(7)
    masks, maps = random_case(rng, quantise=None)
    labels = masks.reshape(masks.shape[0], -1).any(1).astype(int)
    labels[0] = 1
    labels = np.r_[labels, 0]
    masks, maps = np.concatenate([masks, masks[:1] * False]), np.concatenate([maps, maps[:1]])
    res = evaluate_category(labels, maps.reshape(len(maps), -1).max(1), masks, maps)
    assert set(res) == {"image_auroc", "image_ap", "pixel_auroc", "aupro"}
    assert res["aupro"] == pytest.approx(slow_aupro(masks, maps), abs=1e-6)
    mean = mean_over_categories({"a": res, "b": {k: 0.0 for k in res}})
    assert mean["aupro"] == pytest.approx(res["aupro"] / 2)
    assert np.isnan(mean_over_categories({"a": res, "b": {k: float("nan") for k in res}})["image_ap"])
