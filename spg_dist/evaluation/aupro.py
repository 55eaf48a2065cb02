"""AUPRO: area under the per-region-overlap curve up to a false-positive-rate limit, vectorised with NumPy.

Definition followed: anomalib 2.7.0 ``anomalib.metrics.aupro._AUPRO`` (the sort-based ``compute_pro``), which is
the MVTec AD definition (Bergmann et al.):

* Regions are the connected components of the ground truth, **8-connected** within one image (anomalib runs
  ``cv2.connectedComponents`` with its default connectivity 8 per image); regions never span two images.
* One global ranking of all pixels of all images. At each distinct score ``t`` (descending), FPR(t) = share of
  normal pixels with score >= t, PRO(t) = mean over regions of the share of the region's pixels with score >= t.
  Ties form one curve point (anomalib drops duplicate thresholds); ``(0, 0)`` is prepended.
* The curve is cut at the last point with FPR <= limit; if that point lies below the limit, the segment to the next
  point is linearly interpolated at the limit. The trapezoidal area is divided by the last FPR (the limit, or 1.0 when
  the limit is >= 1).
* Scores are ranked as float32 and the limit is the float32 value of ``fpr_limit``, as anomalib does (its preds
  are cast with ``.float()`` and its limit is a float32 buffer); this only matters for ties and is ~1e-8 relative.

Where this differs from anomalib: (1) degenerate inputs (no anomalous pixel, or no normal pixel) give NaN with a
warning, where anomalib returns 0.0; (2) the curve is accumulated in float64 rather than float32, so results agree
with anomalib to float32 rounding (~1e-6), not bit for bit.

How it is vectorised (why no sort over all pixels is needed): the area under a curve whose FPR steps only at
normal pixels is a sum over normal pixels of ``(PRO just above + PRO at) / 2 / n_normal``; swapping the sums makes it
a weighted count, over anomalous pixels, of normal pixels ranked below them. So: one O(n) partition finds the score
at which FPR crosses the limit, only the normal pixels above it are sorted, and the anomalous pixels (few) are
located in them with ``searchsorted``. Components come from one ``scipy.ndimage.label`` call over the stack.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage

__all__ = ["aupro", "region_labels"]

# 8-connectivity inside each image, nothing across the image axis: anomalib's cv2.connectedComponents per image.
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True


def _as_stack(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and bring masks/maps to [N, H, W] (bool, float32); a singleton channel axis is dropped."""
    masks, maps = np.asarray(masks), np.asarray(maps)
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if masks.ndim == 2:
        masks, maps = masks[None], maps[None] if maps.ndim == 2 else maps
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"masks and maps must both be [N, H, W]; got {masks.shape} and {maps.shape}")
    if masks.dtype != bool:
        if masks.size and (masks.min() < 0 or masks.max() > 1):
            raise ValueError("masks must be binary (0/1 or bool); got values outside [0, 1] (a 0/255 mask?)")
        masks = masks > 0.5  # anomalib casts to uint8 via cv2; 0/1 inputs map identically
    maps = maps.astype(np.float32, copy=False)
    if not np.isfinite(maps).all():
        raise ValueError("maps contain NaN or inf")
    return masks, maps


def region_labels(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the ground-truth regions of a [N, H, W] bool stack: 8-connected per image, unique over the stack."""
    labels, n = ndimage.label(masks, structure=_STRUCTURE)
    return labels, int(n)


def _flat_ragged(masks: list, maps: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Images of different sizes (masks at their native resolution): per-image 8-connected labels made unique by
    an offset, and every pixel flattened into one ranking, exactly as one stack would be."""
    if len(masks) != len(maps):
        raise ValueError(f"{len(masks)} masks for {len(maps)} maps")
    fgs, labs, scs, total = [], [], [], 0
    for mask, amap in zip(masks, maps):
        m, a = _as_stack(np.asarray(mask)[None], np.asarray(amap)[None])
        lab, n = ndimage.label(m[0], structure=_STRUCTURE[1])
        lab = np.where(lab > 0, lab + total, 0)
        total += int(n)
        fgs.append(m.ravel())
        labs.append(lab.ravel())
        scs.append(a.ravel())
    return np.concatenate(fgs), np.concatenate(labs), np.concatenate(scs), total


def _last_count_within(limit32: np.float32, n_bg: int) -> int:
    """Largest count c of normal pixels whose FPR, as anomalib computes it (float32 c / float32 n), is <= limit."""
    nb = np.float32(n_bg)

    def within(c: int) -> bool:
        return bool(np.float32(c) / nb <= limit32)

    c = min(n_bg, int(np.floor(float(limit32) * n_bg)))
    while c < n_bg and within(c + 1):
        c += 1
    while c > 0 and not within(c):
        c -= 1
    return c


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve for FPR in [0, fpr_limit], divided by fpr_limit (anomalib 2.7).

    Args:
        masks: ground truth, [N, H, W] (or [N, 1, H, W]) bool or 0/1 integers; nonzero = anomalous pixel; or a list
            of [H_i, W_i] masks of different sizes (each image at its own resolution).
        maps: anomaly maps of the same shape(s); higher = more anomalous. Ranked as float32 (see module docstring).
        fpr_limit: upper end of the FPR integration range (MVTec AD convention: 0.3).

    Returns:
        AUPRO in [0, 1]; NaN (with a ``RuntimeWarning``) when there is no anomalous or no normal pixel.
    """
    if not fpr_limit > 0:
        raise ValueError(f"fpr_limit must be > 0, got {fpr_limit}")
    if isinstance(masks, (list, tuple)):
        fg, flat_labels, scores, n_regions = _flat_ragged(list(masks), list(maps))
    else:
        masks, maps = _as_stack(masks, maps)
        labels, n_regions = region_labels(masks)
        fg, flat_labels, scores = masks.ravel(), labels.ravel(), maps.ravel()
    n_bg = int(fg.size - np.count_nonzero(fg))
    if n_regions == 0 or n_bg == 0:
        what = "no anomalous pixel" if n_regions == 0 else "no normal pixel"
        warnings.warn(f"AUPRO is undefined with {what} in the ground truth; returning NaN", RuntimeWarning, stacklevel=2)
        return float("nan")

    # Per anomalous pixel: its score and weight 1 / (size of its region), so PRO(t) = sum(w[s >= t]) / n_regions.
    fg_labels = flat_labels[fg]
    sizes = np.bincount(fg_labels, minlength=n_regions + 1).astype(np.float64)
    fg_scores = scores[fg]
    order = np.argsort(fg_scores, kind="stable")
    fs = fg_scores[order]
    ws = (1.0 / sizes[fg_labels])[order]
    bg_scores = scores[~fg]  # a fresh copy, partitioned in place below

    limit32 = np.float32(fpr_limit)
    limit = float(limit32)
    m = _last_count_within(limit32, n_bg)  # FPR <= limit holds for the first m normal pixels in rank order
    if m >= n_bg:  # the whole curve lies within the limit: anomalib normalises by the last FPR, 1.0
        top, t_star, norm = np.sort(bg_scores), None, 1.0
    else:
        k = n_bg - m - 1  # t_star: the (m + 1)-th highest normal score, where FPR first exceeds the limit
        bg_scores.partition(k)
        t_star = bg_scores[k]
        top = np.sort(bg_scores[k:])
        top = top[np.searchsorted(top, t_star, side="right") :]  # normal scores strictly above t_star
        norm = limit

    # Area over full segments: sum over anomalous pixels of w * (#normal above t_star and below s + #... <= s).
    counts = np.searchsorted(top, fs, side="left") + np.searchsorted(top, fs, side="right")
    area = float(np.dot(ws, counts.astype(np.float64))) / (2.0 * n_regions * n_bg)

    if t_star is not None:
        # Partial segment from the last point within the limit (F_i, P_i) towards the tie group at t_star.
        b_i = top.size
        f_i = b_i / n_bg
        if np.float32(b_i) / np.float32(n_bg) < limit32:
            above = np.searchsorted(fs, t_star, side="right")
            at = np.searchsorted(fs, t_star, side="left")
            p_i = float(ws[above:].sum()) / n_regions
            p_gain = float(ws[at:above].sum()) / n_regions
            n_at = int(np.count_nonzero(bg_scores == t_star))
            delta = limit - f_i
            p_lim = p_i + p_gain * delta / (n_at / n_bg)
            area += delta * (p_i + p_lim) / 2.0
    return min(area / norm, 1.0)
