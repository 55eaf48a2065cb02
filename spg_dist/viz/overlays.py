"""Evaluation overlays: for a test image, the image itself, its ground-truth mask over it, and the anomaly map as a
heatmap over it (with a colorbar and the image score in the title), one PNG per image.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch), like
:mod:`spg_dist.viz.atoms`. An image file that cannot be read (moved, not mounted here) is drawn as a grey
placeholder, so the mask and the map are still shown.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from spg_dist.data.imageio import ImageDecodeError, load_image
from spg_dist.viz.figures import save_figure

MIN_DISPLAY_PX = 256  # images are shown at the mask size or this, whichever is larger


def pick_overlay_indices(labels: Sequence[int], n: int) -> list[int]:
    """Up to ``n`` indices: anomalous images first (in order), then normal ones."""
    labels = [int(x) for x in labels]
    bad = [i for i, y in enumerate(labels) if y == 1]
    good = [i for i, y in enumerate(labels) if y != 1]
    return (bad + good)[:max(int(n), 0)]


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "image"


def overlay_names(image_ids: Sequence[str]) -> list[str]:
    """File-name stems for images of one category: the file stem, prefixed by its parent folder(s) on a clash."""
    parts = [str(i).replace("\\", "/").split("/") for i in image_ids]
    parts = [p[:-1] + [os.path.splitext(p[-1])[0] or p[-1]] for p in parts]
    names: list[str] = []
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        names = [_safe("_".join(p[-depth:])) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{n}_{i}" for i, n in enumerate(names)]


def load_display_image(uri: str | None, size: int) -> np.ndarray | None:
    """RGB uint8 [size, size, 3], or ``None`` when there is no readable image."""
    if not uri:
        return None
    try:
        return load_image(uri, size)
    except (ImageDecodeError, OSError):
        return None


def overlay_png(image: np.ndarray | None, mask: np.ndarray, amap: np.ndarray, score: float, out_path: str | os.PathLike,
                title: str = "", label: int | None = None, vmin: float | None = None,
                vmax: float | None = None) -> Path:
    """Three panels — image | ground truth over the image | anomaly map over the image (+ colorbar); returns the path.

    ``mask`` and ``amap`` are [H, W] on the same grid; ``image`` is RGB of any size (drawn to the same extent), or
    ``None`` for a grey placeholder.
    """
    mask = np.asarray(mask) > 0
    amap = np.asarray(amap, np.float32)
    h, w = amap.shape
    extent = (0, w, h, 0)
    missing = image is None
    if missing:
        image = np.full((max(h, MIN_DISPLAY_PX), max(w, MIN_DISPLAY_PX), 3), 128, np.uint8)
    lo = float(amap.min()) if vmin is None else vmin
    hi = float(amap.max()) if vmax is None else vmax
    if hi <= lo:
        hi = lo + 1e-6

    fig = Figure(figsize=(11.5, 4.0))
    axes = fig.subplots(1, 3)
    axes[0].imshow(image, extent=extent, interpolation="bilinear")
    axes[0].set_title("image" + (" (unavailable)" if missing else ""), fontsize=9)
    axes[1].imshow(image, extent=extent, interpolation="bilinear")
    red = ListedColormap([(0, 0, 0, 0), (1, 0, 0, 0.45)])
    axes[1].imshow(mask.astype(np.uint8), cmap=red, vmin=0, vmax=1, extent=extent, interpolation="nearest")
    if mask.any() and not mask.all():
        axes[1].contour(np.arange(w) + 0.5, np.arange(h) + 0.5, mask.astype(float), levels=[0.5], colors="red",
                        linewidths=1.2)
    axes[1].set_title(f"ground truth ({int(mask.sum())} px)" if mask.any() else "ground truth (normal)", fontsize=9)
    axes[2].imshow(image, extent=extent, interpolation="bilinear")
    im = axes[2].imshow(amap, cmap="jet", alpha=0.5, vmin=lo, vmax=hi, extent=extent, interpolation="bilinear")
    if mask.any() and not mask.all():
        axes[2].contour(np.arange(w) + 0.5, np.arange(h) + 0.5, mask.astype(float), levels=[0.5], colors="white",
                        linewidths=0.8)
    axes[2].set_title(f"anomaly map  (score {score:.4f})", fontsize=9)
    fig.colorbar(im, ax=axes[2], fraction=0.046, pad=0.04)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
    tag = "" if label is None else ("  [anomalous]" if int(label) == 1 else "  [normal]")
    fig.suptitle(f"{title}{tag}  image score {score:.4f}", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_path)


def write_category_overlays(category: str, image_ids: Sequence[str], labels: Sequence[int], scores: Sequence[float],
                            masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], image_uris: dict[str, str],
                            out_dir: str | os.PathLike, n: int = 8) -> list[Path]:
    """``out_dir/<category>__<image name>.png`` for up to ``n`` images (anomalous first); returns the paths.

    The colour scale is shared within the category (min..max of the drawn maps), so panels compare.
    """
    pick = pick_overlay_indices(labels, n)
    if not pick:
        return []
    names = overlay_names(image_ids)
    lo = float(min(np.min(maps[i]) for i in pick))
    hi = float(max(np.max(maps[i]) for i in pick))
    out = []
    for i in pick:
        amap = np.asarray(maps[i])
        size = max(amap.shape[0], amap.shape[1], MIN_DISPLAY_PX)
        image = load_display_image(image_uris.get(image_ids[i], ""), size)
        out.append(overlay_png(image, masks[i], amap, float(scores[i]),
                               Path(out_dir) / f"{_safe(category)}__{names[i]}.png",
                               title=f"{category} / {image_ids[i]}", label=int(labels[i]), vmin=lo, vmax=hi))
    return out


__all__ = ["MIN_DISPLAY_PX", "load_display_image", "overlay_names", "overlay_png", "pick_overlay_indices",
           "write_category_overlays"]
