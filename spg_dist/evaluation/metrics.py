"""Image- and pixel-level detection metrics, as the field reports them (the paper's "Metrics").

Definitions followed:

* image AUROC, image AP: scikit-learn ``roc_auc_score`` / ``average_precision_score`` (called directly).
* pixel AUROC: scikit-learn ``roc_auc_score`` on the flattened masks and maps. Computed here by an equivalent
  exact rank statistic (AUROC = P(s_anomalous > s_normal) + P(tie) / 2, the area under sklearn's tie-collapsed
  trapezoidal ROC) because sklearn's stable argsort over ~10^8 float64 pixels is the slowest step of an evaluation;
  we sort the two classes separately and count in integers, so the value equals sklearn to ~1e-12.
* AUPRO: anomalib 2.7's sort-based ``_AUPRO`` at FPR limit 0.3 (see :mod:`spg_dist.evaluation.aupro`).

Degenerate inputs (one class only) give NaN and a ``RuntimeWarning`` instead of sklearn's exception, so that one
odd category does not abort a whole benchmark run; a NaN then propagates into the category mean on purpose.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from .aupro import aupro

__all__ = ["METRICS", "evaluate_category", "image_ap", "image_auroc", "mean_over_categories", "pixel_auroc"]

METRICS: tuple[str, ...] = ("image_auroc", "image_ap", "pixel_auroc", "aupro")


def _binary_labels(labels: np.ndarray, name: str) -> np.ndarray:
    """Flatten labels to bool, refusing anything but 0/1 (a 0/255 mask would otherwise count as all-anomalous)."""
    labels = np.asarray(labels).ravel()
    if labels.dtype != bool:
        if labels.size and (labels.min() < 0 or labels.max() > 1):
            raise ValueError(f"{name} must be binary (0/1 or bool)")
        labels = labels > 0.5
    return labels


def _scores(scores: np.ndarray, n: int, name: str) -> np.ndarray:
    """Flatten scores and check they match the labels and are finite (sklearn would fail later, less clearly)."""
    scores = np.asarray(scores).ravel()
    if scores.size != n:
        raise ValueError(f"{name}: {scores.size} scores for {n} labels")
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} contain NaN or inf")
    return scores


def _one_class(labels: np.ndarray, what: str) -> bool:
    """True (and warn) when only one class is present, where AUROC/AP are undefined."""
    n_pos = int(np.count_nonzero(labels))
    if 0 < n_pos < labels.size:
        return False
    which = "anomalous" if n_pos else "normal"
    warnings.warn(f"{what} is undefined: only {which} samples are present; returning NaN", RuntimeWarning, stacklevel=3)
    return True


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image-level AUROC (sklearn ``roc_auc_score``); labels 1 = anomalous, higher score = more anomalous."""
    y = _binary_labels(labels, "labels")
    s = _scores(scores, y.size, "scores")
    return float("nan") if _one_class(y, "image AUROC") else float(roc_auc_score(y, s))


def image_ap(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image-level average precision (sklearn ``average_precision_score``, anomalous = positive class)."""
    y = _binary_labels(labels, "labels")
    s = _scores(scores, y.size, "scores")
    return float("nan") if _one_class(y, "image AP") else float(average_precision_score(y, s))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Pixel-level AUROC over all pixels of all images pooled; equal to sklearn ``roc_auc_score`` on the flattened arrays.

    Each anomalous pixel counts the normal pixels strictly below it and at most equal to it (two binary searches in
    the sorted normal scores); the sum of both counts is twice the Mann-Whitney U with ties counted half. All counts
    are int64, so the only rounding is the final division.
    """
    y = _binary_labels(masks, "masks")
    s = _scores(maps, y.size, "maps")
    if _one_class(y, "pixel AUROC"):
        return float("nan")
    neg = np.sort(s[~y])
    pos = np.sort(s[y])  # sorted queries make the binary searches cache-friendly
    twice_u = int(np.searchsorted(neg, pos, side="left").sum(dtype=np.int64))
    twice_u += int(np.searchsorted(neg, pos, side="right").sum(dtype=np.int64))
    return twice_u / (2.0 * pos.size * neg.size)


def evaluate_category(
    labels: np.ndarray,
    image_scores: np.ndarray,
    masks: np.ndarray,
    maps: np.ndarray,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """All four metrics of one category: image AUROC / AP from image scores, pixel AUROC / AUPRO from maps.

    Args:
        labels: [N] image labels, 1 = anomalous.
        image_scores: [N] image anomaly scores.
        masks: [N, H, W] ground-truth masks (all zero for normal images), or a list of [H_i, W_i] masks when the
            images are evaluated at their own (native) resolutions.
        maps: anomaly maps at the masks' resolution(s), same form as ``masks``.
        fpr_limit: AUPRO integration limit (0.3 in the field).
    """
    if isinstance(masks, (list, tuple)):
        flat_masks = np.concatenate([np.asarray(m).ravel() for m in masks])
        flat_maps = np.concatenate([np.asarray(m).ravel() for m in maps])
    else:
        flat_masks, flat_maps = masks, maps
    return {
        "image_auroc": image_auroc(labels, image_scores),
        "image_ap": image_ap(labels, image_scores),
        "pixel_auroc": pixel_auroc(flat_masks, flat_maps),
        "aupro": aupro(masks, maps, fpr_limit=fpr_limit),
    }


def mean_over_categories(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean over categories of each metric, as papers report it.

    A NaN in any category makes the mean NaN: silently dropping a category would change the denominator and make
    the figure incomparable with published ones.
    """
    if not per_category:
        raise ValueError("no categories to average")
    keys = [k for k in METRICS if all(k in r for r in per_category.values())]
    return {k: float(np.mean([float(r[k]) for r in per_category.values()])) for k in keys}
