"""Atom pictures: a gallery of an atom's strongest patches, and the firing-statistics overview of an SAE.

The gallery is SPG's "Interpretation" figure: for each top patch, the patch itself (cut from the image as the
backbone saw it, i.e. resized to the extraction square) and the whole image with the atom's activation map
bilinearly upsampled over it, so a reader sees both *what* the atom responds to and *where*. Figures are
drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch), so this is safe in
headless CLI processes and Ray workers alike.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from spg_dist.data.imageio import ImageDecodeError, load_image
from spg_dist.store.atoms import activation_maps, sae_info
from spg_dist.store.connection import Store
from spg_dist.store import images, tokens
from spg_dist.store.tokens import TokenSelection
from spg_dist.viz.figures import save_figure

DEFAULT_PATCH_PX = 16  # patch side assumed when the extraction size is unknown (no patch_tokens rows)


def upsample_bilinear(m: np.ndarray, out_h: int, out_w: int | None = None) -> np.ndarray:
    """Bilinear resize of a [h, w] map with half-pixel centres (as torch ``align_corners=False``)."""
    out_w = out_h if out_w is None else out_w
    m = np.asarray(m, np.float64)
    h, w = m.shape
    ys = np.clip((np.arange(out_h) + 0.5) * h / out_h - 0.5, 0, h - 1)
    xs = np.clip((np.arange(out_w) + 0.5) * w / out_w - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = m[y0][:, x0] * (1 - wx) + m[y0][:, x1] * wx
    bot = m[y1][:, x0] * (1 - wx) + m[y1][:, x1] * wx
    return (top * (1 - wy) + bot * wy).astype(np.float32)


def _rows(rows: Any) -> list[dict]:
    if isinstance(rows, (pa.Table, pa.RecordBatch)):
        return rows.to_pylist()
    if hasattr(rows, "to_dict"):
        return rows.to_dict("records")
    return [r if isinstance(r, dict) else vars(r) for r in rows]


def _extraction_sizes(store: Store, sae_id: str, image_ids: Sequence[str]) -> dict[str, int]:
    """Side of the square each image was resized to before the backbone (from patch_tokens' scalars)."""
    info = sae_info(store, sae_id)
    if info.backbone is None:
        return {}
    t = tokens.metadata(store, TokenSelection.of(info.backbone, info.layer, image_ids=list(image_ids)),
                        ["image_id", "image_size"])
    return dict(zip(t.column("image_id").to_pylist(), t.column("image_size").to_pylist()))


def _short(image_id: str, parts: int = 3) -> str:
    return "/".join(image_id.split("/")[-parts:])


def atom_gallery_png(store: Store, sae_id: str, atom: int, rows: Any, out_path: str | os.PathLike,
                     image_size: int | None = None, cols: int = 4) -> Path:
    """Draw ``rows`` (from :func:`top_patches`) as (patch crop, image + activation map) pairs; returns the path.

    ``image_size`` overrides the extraction square side (default: read from patch_tokens, else
    grid * 16 px). The heatmap's colour and opacity scale with the activation, shared across the gallery so
    strengths are comparable; the top patch is outlined on each image.
    """
    rows = _rows(rows)
    if not rows:
        fig = Figure(figsize=(5, 1.5))
        fig.text(0.5, 0.5, f"{sae_id}\natom {atom} never fires in the encoded data", ha="center", va="center")
        return save_figure(fig, out_path)
    info = sae_info(store, sae_id)
    ids = list(dict.fromkeys(r["image_id"] for r in rows))
    imgs = images.rows(store, image_ids=ids, columns=["image_id", "image_uri"])
    uris = dict(zip(imgs.column("image_id").to_pylist(), imgs.column("image_uri").to_pylist()))
    sizes = {} if image_size else _extraction_sizes(store, sae_id, ids)
    maps = activation_maps(store, sae_id, ids, atom)
    vmax = max(max(float(m.max()) for m in maps.values()), 1e-12)
    cols = max(1, min(cols, len(rows)))
    nrows = math.ceil(len(rows) / cols)
    fig = Figure(figsize=(2 * cols * 1.9, nrows * 2.3 + 0.4))
    fig.suptitle(f"{sae_id} · atom {atom} · top {len(rows)} patches", fontsize=9)
    gh, gw = info.grid_h, info.grid_w
    for i, r in enumerate(rows):
        ax_crop = fig.add_subplot(nrows, 2 * cols, 2 * i + 1)
        ax_img = fig.add_subplot(nrows, 2 * cols, 2 * i + 2)
        side = int(image_size or sizes.get(r["image_id"]) or DEFAULT_PATCH_PX * max(gh, gw))
        try:
            img = load_image(uris[r["image_id"]], side)
        except (KeyError, ImageDecodeError):
            img = np.full((side, side, 3), 128, np.uint8)   # a missing file must not lose the other patches
            ax_img.text(side / 2, side / 2, "image\nunavailable", ha="center", va="center", fontsize=7)
        ph, pw = side / gh, side / gw
        y0, x0 = int(round(r["row"] * ph)), int(round(r["col"] * pw))
        crop = img[y0:max(y0 + 1, int(round((r["row"] + 1) * ph))), x0:max(x0 + 1, int(round((r["col"] + 1) * pw)))]
        ax_crop.imshow(crop, interpolation="nearest")
        ax_crop.set_title(f"#{r.get('rank', i)} {_short(r['image_id'])}\n{r['category']} · {r['value']:.3g}",
                          fontsize=7)
        heat = upsample_bilinear(maps[r["image_id"]], side, side)
        ax_img.imshow(img)
        ax_img.imshow(heat, cmap="inferno", vmin=0, vmax=vmax, alpha=np.clip(heat / vmax, 0, 1) * 0.75)
        ax_img.add_patch(Rectangle((r["col"] * pw - 0.5, r["row"] * ph - 0.5), pw, ph, fill=False,
                                   edgecolor="cyan", linewidth=1.5))
        ax_img.set_title("activation map", fontsize=7)
        for ax in (ax_crop, ax_img):
            ax.set_xticks([])
            ax.set_yticks([])
        for s in ax_crop.spines.values():
            s.set_edgecolor("cyan")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return save_figure(fig, out_path)


def atom_stats_png(stats: Any, out_path: str | os.PathLike, title: str | None = None) -> Path:
    """Overview of an SAE's atoms from :func:`atom_stats`: log10 firing frequency vs category entropy.

    Lower left: rare, category-specific atoms; upper right: frequent, shared ones (texture, background).
    Colour: share of each atom's mass on anomalous images, the atoms an anomaly detector leans on. Margins
    show both distributions; dead atoms (never fire) are counted in the corner.
    """
    df = stats
    fired = df[df["count"] > 0]
    fig = Figure(figsize=(7.5, 6.5))
    gs = fig.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4), hspace=0.05, wspace=0.05)
    ax = fig.add_subplot(gs[1, 0])
    ax_top, ax_right = fig.add_subplot(gs[0, 0], sharex=ax), fig.add_subplot(gs[1, 1], sharey=ax)
    fig.suptitle(title or "SAE atoms: firing frequency vs category entropy", fontsize=10)
    if len(fired):
        x = np.log10(fired["frequency"].to_numpy(np.float64))
        y = fired["category_entropy"].to_numpy(np.float64)
        colour = fired["anomalous_share"].to_numpy(np.float64)
        label = "share of mass on anomalous images"
        if not np.any(colour > 0):
            colour, label = fired["mean_activation"].to_numpy(np.float64), "mean activation"
        sc = ax.scatter(x, y, c=colour, s=10, cmap="viridis", alpha=0.8, linewidths=0)
        cax = ax.inset_axes((0.55, 0.12, 0.4, 0.03))
        fig.colorbar(sc, cax=cax, orientation="horizontal").set_label(label, fontsize=7)
        cax.tick_params(labelsize=6)
        ax_top.hist(x, bins=40, color="0.4")
        ax_right.hist(y, bins=np.linspace(0, 1, 26), orientation="horizontal", color="0.4")
    else:
        ax.text(0.5, 0.5, "no atom fires", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("log10 firing frequency (firings / encoded patches)")
    ax.set_ylabel("category entropy (0 = one category, 1 = even)")
    ax.set_ylim(-0.05, 1.05)
    dead = int((df["count"] == 0).sum())
    ax.text(0.01, 0.99, f"{len(df)} atoms, {dead} dead ({dead / max(len(df), 1):.1%})", transform=ax.transAxes,
            va="top", fontsize=8)
    ax_top.tick_params(labelbottom=False)
    ax_right.tick_params(labelleft=False)
    ax_top.set_ylabel("atoms", fontsize=8)
    ax_right.set_xlabel("atoms", fontsize=8)
    return save_figure(fig, out_path)


__all__ = ["atom_gallery_png", "atom_stats_png", "upsample_bilinear"]
