"""Evaluation overlays: for a test image, the image itself, its ground-truth mask over it, and the anomaly map as a
heatmap over it (with a colorbar and the image score in the title), one PNG per image; and
:func:`method_overlays`, several methods' maps side by side (one row per image, a colour bar per method).

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
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
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




def method_overlays(images: list[np.ndarray], masks: list[np.ndarray | None], maps: dict[str, list[np.ndarray]],
                    titles: list[str], out_path: Path, vmax: dict | None = None) -> Path:
    """Save :func:`method_overlays_figure` (see there) to ``out_path``; returns it."""
    return save_figure(method_overlays_figure(images, masks, maps, titles, vmax), out_path)


def method_overlays_figure(images: list[np.ndarray], masks: list[np.ndarray | None],
                           maps: dict[str, list[np.ndarray]], titles: list[str], vmax: dict | None = None) -> Figure:
    """One figure comparing methods side by side.

    One row per image: the image with its ground-truth defect outlined (``masks[i]`` None or empty: normal
    image), then per method (``maps[method][i]``, an [H, W] score map on any grid, drawn to the image's extent)
    the map as a semi-transparent heat over the image with the defect outline on top. Column titles are the
    method names; each method column has its own colour bar and its own scale, stated on the bar: the method's
    minimum .. maximum over the drawn maps (maximum ``vmax[method]`` when given). Scores of different methods
    are not comparable, so they are never put on one scale. ``titles[i]`` labels row i.
    """
    n = len(images)
    if not (len(masks) == len(titles) == n and all(len(v) == n for v in maps.values())):
        raise ValueError(f"method_overlays: {n} images, {len(masks)} masks, {len(titles)} titles, maps of lengths "
                         f"{ {k: len(v) for k, v in maps.items()} } (all must be equal)")
    methods = list(maps)
    vmax = dict(vmax or {})
    fig = Figure(figsize=(2.6 * (1 + len(methods)) + 0.6, 2.5 * max(n, 1) + 1.1), layout="constrained")
    axes = np.asarray(fig.subplots(max(n, 1), 1 + len(methods), squeeze=False))
    scales = {}
    for m in methods:
        arrs = [np.asarray(a, np.float64) for a in maps[m]]
        lo = min((float(np.nanmin(a)) for a in arrs), default=0.0)
        hi = float(vmax[m]) if m in vmax and vmax[m] is not None else max((float(np.nanmax(a)) for a in arrs),
                                                                          default=1.0)
        scales[m] = (lo, hi if hi > lo else lo + 1e-6)
    for i in range(n):
        img = np.asarray(images[i])
        h, w = img.shape[:2]
        extent = (0, w, h, 0)
        mask = None if masks[i] is None else np.asarray(masks[i]) > 0
        ax = axes[i, 0]
        ax.imshow(img, extent=extent)
        _outline(ax, mask, w, h, "lime")
        ax.set_ylabel(titles[i], fontsize=8)
        for j, m in enumerate(methods, start=1):
            ax = axes[i, j]
            lo, hi = scales[m]
            a = np.asarray(maps[m][i], np.float64)
            ax.imshow(img, extent=extent)
            alpha = np.clip((a - lo) / (hi - lo), 0, 1) * 0.35 + 0.25   # the image always shows through
            ax.imshow(a, cmap="jet", vmin=lo, vmax=hi, alpha=alpha, extent=extent, interpolation="bilinear")
            _outline(ax, mask, w, h, "white")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title("image (green: ground truth)", fontsize=9)
    for j, m in enumerate(methods, start=1):
        lo, hi = scales[m]
        axes[0, j].set_title(m, fontsize=10)
        cbar = fig.colorbar(ScalarMappable(norm=Normalize(lo, hi), cmap="jet"), ax=list(axes[:, j]),
                            location="bottom", shrink=0.9, aspect=25, pad=0.02)
        cbar.set_label(f"{m} score {lo:.2g} to {hi:.2g}", fontsize=7)
        cbar.ax.tick_params(labelsize=6)
        cbar.ax.set_label("<colorbar>")
    return fig


def _outline(ax, mask: np.ndarray | None, w: int, h: int, colour: str) -> None:
    """Contour of a ground-truth mask of any size, drawn to an image extent of ``w`` x ``h``."""
    if mask is None or not mask.any() or mask.all():
        return
    mh, mw = mask.shape
    ax.contour((np.arange(mw) + 0.5) * w / mw, (np.arange(mh) + 0.5) * h / mh, mask.astype(float), levels=[0.5],
               colors=colour, linewidths=1.1)


__all__ = ["MIN_DISPLAY_PX", "load_display_image", "method_overlays", "method_overlays_figure", "overlay_names", "overlay_png",
           "pick_overlay_indices", "write_category_overlays"]
