"""Metrics benchmark: ours vs the field's reference implementations on an MVTec-AD-sized test set.

  AUPRO        spg_dist.evaluation.aupro  vs  anomalib 2.7 ``_AUPRO(fpr_limit=0.3)`` (CPU; skipped if not installed:
               ``pip install -c constraints.txt anomalib==2.7.0``, a benchmark-only peer, never a runtime dependency)
  pixel AUROC  spg_dist.evaluation.pixel_auroc  vs  sklearn ``roc_auc_score`` on the flattened arrays

Data are synthetic (≈1,700 masks at 256², like MVTec AD's test split): blob-shaped ground-truth regions in ~2/3 of
the images, maps = smooth noise + a signal inside the regions. Prints median-of-N wall time, values, the speed-up
and the absolute difference. Targets (issue 5): |Δ AUPRO| <= 1e-4 and >= 2x faster than anomalib.

    python bench/metrics.py                    # 1,700 x 256 x 256, median of 3
    python bench/metrics.py --n 200 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from spg_dist.evaluation import aupro, pixel_auroc


def smooth_noise(rng: np.random.Generator, n: int, size: int, cells: int) -> np.ndarray:
    """[n, size, size] float32 smooth random field in ~[0, 1]: bilinear upsampling of a coarse uniform grid."""
    coarse = rng.random((n, cells + 1, cells + 1), dtype=np.float32)
    return ndimage.zoom(coarse, (1, size / (cells + 1), size / (cells + 1)), order=1).astype(np.float32)


def synthetic_set(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Masks with irregular blobs of varied sizes (several regions per image) in 2/3 of images; matching maps."""
    rng = np.random.default_rng(seed)
    field = smooth_noise(rng, n, size, cells=5)
    masks = field > rng.uniform(0.75, 0.92, size=(n, 1, 1)).astype(np.float32)  # per-image anomaly extent
    masks[rng.random(n) >= 2 / 3] = False  # ~1/3 normal images
    maps = 0.6 * smooth_noise(rng, n, size, cells=32) + 0.1 * rng.random((n, size, size), dtype=np.float32)
    maps += masks * rng.uniform(0.1, 0.6, size=(n, 1, 1)).astype(np.float32)
    return masks, maps.astype(np.float32)


def timed(fn: Callable[[], float], repeats: int) -> tuple[float, float]:
    """(median wall seconds, value) over `repeats` runs."""
    times, value = [], float("nan")
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), value


def anomalib_aupro(masks: np.ndarray, maps: np.ndarray) -> Callable[[], float] | None:
    """anomalib 2.7's _AUPRO on CPU tensors, or None when anomalib is not installed."""
    try:
        import torch
        from anomalib.metrics.aupro import _AUPRO
    except ImportError:
        return None
    preds, target = torch.from_numpy(maps), torch.from_numpy(masks.astype(np.float32))

    def run() -> float:
        metric = _AUPRO(fpr_limit=0.3)
        metric.update(preds, target)
        return float(metric.compute())

    return run


def report(name: str, ours: tuple[float, float], ref: tuple[float, float] | None, ref_name: str) -> None:
    """One block of output: times, values, speed-up and |Δ|."""
    print(f"{name}: ours {ours[0]:.2f} s  value {ours[1]:.6f}")
    if ref is None:
        print(f"{name}: {ref_name} not installed; comparison skipped")
        return
    print(f"{name}: {ref_name} {ref[0]:.2f} s  value {ref[1]:.6f}")
    print(f"{name}: speed-up {ref[0] / ours[0]:.1f}x   |diff| {abs(ours[1] - ref[1]):.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1700)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-sklearn", action="store_true", help="skip the (slow) sklearn pixel AUROC reference")
    args = ap.parse_args()

    t0 = time.perf_counter()
    masks, maps = synthetic_set(args.n, args.size)
    _, n_regions = ndimage.label(masks, structure=np.pad(np.ones((1, 3, 3), bool), ((1, 1), (0, 0), (0, 0))))
    print(
        f"data: {args.n} x {args.size}^2 = {masks.size / 1e6:.0f} M pixels, {masks.mean():.2%} anomalous, "
        f"{int(masks.any(axis=(1, 2)).sum())} anomalous images, {n_regions} regions ({time.perf_counter() - t0:.1f} s)"
    )

    ours = timed(lambda: aupro(masks, maps), args.repeats)
    ref_fn = anomalib_aupro(masks, maps)
    ref = timed(ref_fn, args.repeats) if ref_fn is not None else None
    report("AUPRO@0.3", ours, ref, "anomalib 2.7 _AUPRO")

    ours = timed(lambda: pixel_auroc(masks, maps), args.repeats)
    ref = None if args.skip_sklearn else timed(lambda: float(roc_auc_score(masks.ravel(), maps.ravel())), args.repeats)
    report("pixel AUROC", ours, ref, "sklearn roc_auc_score")


if __name__ == "__main__":
    main()
