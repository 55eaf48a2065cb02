"""Atom pictures: a gallery of an atom's strongest patches, and the firing-statistics overview of an SAE.

The gallery is SPG's "Interpretation" figure: for each top patch, the patch itself (cut from the image as the
backbone saw it, i.e. resized to the extraction square), the whole image with its ground-truth defect outlined,
and next to it the atom's activation map bilinearly upsampled over the image (semi-transparent, on a labelled
colour scale), so a reader sees *what* the atom responds to, *where*, and whether that is the defect. Figures are
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
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from spg_dist.data.imageio import ImageDecodeError, load_image, load_mask
from spg_dist.store.atoms import activation_maps, sae_info
from spg_dist.store.connection import Store
from spg_dist.store import images, tokens
from spg_dist.store.tokens import TokenSelection
from spg_dist.viz.figures import save_figure
from spg_dist.viz.sae_figures import sae_label

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


GT_COLOUR, BOX_COLOUR, HEAT_CMAP = "lime", "cyan", "inferno"
HEAT_ALPHA = 0.6  # strongest activation: 60 % heat over 40 % image; silent patches leave the image untouched
_COLORBAR_LABEL = "<colorbar>"


def gallery_title(atom: int, sae: str, role: str | None = None, coefficient: float | None = None,
                  n: int | None = None) -> str:
    """Short title of an atom gallery, e.g. ``"anomaly-guide atom 900 · coefficient 0.118 · SAE C=1024 k=16"``."""
    parts = [f"{role} atom {atom}" if role else f"atom {atom}"]
    if coefficient is not None:
        parts.append(f"coefficient {coefficient:.3g}")
    parts.append(sae)
    if n is not None and role is None and coefficient is None:
        parts.append(f"top {n} patches")
    return " · ".join(parts)


def _mask(uri: str | None, side: int) -> np.ndarray | None:
    if not uri:
        return None
    try:
        m = load_mask(uri, side)
    except (ImageDecodeError, OSError, ValueError):
        return None
    return m if m.any() else None


def _contour(ax: Any, mask: np.ndarray | None, colour: str, width: float = 1.2) -> None:
    if mask is not None and mask.any() and not mask.all():
        h, w = mask.shape
        ax.contour(np.arange(w), np.arange(h), mask.astype(float), levels=[0.5], colors=colour, linewidths=width)


def atom_gallery_figure(store: Store, sae_id: str, atom: int, rows: Any, image_size: int | None = None,
                        cols: int = 4, *, role: str | None = None, coefficient: float | None = None,
                        title: str | None = None) -> Figure:
    """The figure :func:`atom_gallery_png` saves (see there); one colour bar, its axes labelled ``"<colorbar>"``."""
    rows = _rows(rows)
    info = sae_info(store, sae_id)
    head = title or gallery_title(atom, sae_label(store, sae_id, k=info.k), role, coefficient, len(rows))
    if not rows:
        fig = Figure(figsize=(5.5, 1.5))
        fig.text(0.5, 0.5, f"{head}\natom {atom} never fires on the encoded images", ha="center", va="center")
        return fig
    ids = list(dict.fromkeys(r["image_id"] for r in rows))
    imgs = images.rows(store, image_ids=ids, columns=["image_id", "image_uri", "mask_uri", "label"])
    uris = dict(zip(imgs.column("image_id").to_pylist(), imgs.column("image_uri").to_pylist()))
    mask_uris = dict(zip(imgs.column("image_id").to_pylist(), imgs.column("mask_uri").to_pylist()))
    labels = dict(zip(imgs.column("image_id").to_pylist(), imgs.column("label").to_pylist()))
    sizes = {} if image_size else _extraction_sizes(store, sae_id, ids)
    maps = activation_maps(store, sae_id, ids, atom)
    vmax = max(max(float(m.max()) for m in maps.values()), 1e-12)
    norm = Normalize(0.0, vmax)
    cols = max(1, min(cols, len(rows)))
    nrows = math.ceil(len(rows) / cols)
    fig = Figure(figsize=(3 * cols * 1.75 + 1.2, nrows * 2.15 + 0.9), layout="constrained")
    grid = fig.add_gridspec(nrows, 3 * cols, width_ratios=[0.7, 1, 1] * cols)
    gh, gw = info.grid_h, info.grid_w
    axes = []
    for i, r in enumerate(rows):
        rr, cc = divmod(i, cols)
        ax_crop, ax_img, ax_heat = (fig.add_subplot(grid[rr, 3 * cc + j]) for j in range(3))
        axes += [ax_crop, ax_img, ax_heat]
        side = int(image_size or sizes.get(r["image_id"]) or DEFAULT_PATCH_PX * max(gh, gw))
        try:
            img = load_image(uris[r["image_id"]], side)
        except (KeyError, ImageDecodeError):
            img = np.full((side, side, 3), 128, np.uint8)   # a missing file must not lose the other patches
            ax_img.text(side / 2, side / 2, "image\nunavailable", ha="center", va="center", fontsize=7)
        gt = _mask(mask_uris.get(r["image_id"]), side)
        ph, pw = side / gh, side / gw
        y0, x0 = int(round(r["row"] * ph)), int(round(r["col"] * pw))
        crop = img[y0:max(y0 + 1, int(round((r["row"] + 1) * ph))), x0:max(x0 + 1, int(round((r["col"] + 1) * pw)))]
        ax_crop.imshow(crop, interpolation="nearest")
        ax_crop.set_title(f"#{r.get('rank', i)} {r['category']}\nactivation {r['value']:.3g}", fontsize=7)
        tag = {1: " [anomalous]", 0: " [normal]"}.get(labels.get(r["image_id"]), "")
        # the image as it is (ground-truth defect outlined), so the defect is never hidden under the heat
        ax_img.imshow(img)
        _contour(ax_img, gt, GT_COLOUR)
        ax_img.set_title(f"{_short(r['image_id'], 2)}{tag}", fontsize=6.5)
        heat = upsample_bilinear(maps[r["image_id"]], side, side)
        ax_heat.imshow(img)
        ax_heat.imshow(heat, cmap=HEAT_CMAP, norm=norm, alpha=np.clip(heat / vmax, 0, 1) * HEAT_ALPHA)
        if heat.max() > 0.5 * vmax:
            ax_heat.contour(np.arange(side), np.arange(side), heat, levels=[0.5 * vmax], colors="white",
                            linewidths=0.7)
        _contour(ax_heat, gt, GT_COLOUR, 0.9)
        for ax in (ax_img, ax_heat):
            ax.add_patch(Rectangle((r["col"] * pw - 0.5, r["row"] * ph - 0.5), pw, ph, fill=False,
                                   edgecolor=BOX_COLOUR, linewidth=1.2))
        ax_heat.set_title(f"max {float(maps[r['image_id']].max()):.3g}", fontsize=7)
        for ax in (ax_crop, ax_img, ax_heat):
            ax.set_xticks([])
            ax.set_yticks([])
        for sp in ax_crop.spines.values():
            sp.set_edgecolor(BOX_COLOUR)
    cbar = fig.colorbar(ScalarMappable(norm=norm, cmap=HEAT_CMAP), ax=axes, location="right", shrink=0.9,
                        aspect=30, pad=0.01)
    cbar.ax.set_label(_COLORBAR_LABEL)
    cbar.set_label(f"atom {atom} activation per patch\n(SAE code value; 0 = silent, one scale for all tiles)",
                   fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    fig.suptitle(head, fontsize=10)
    caption = ("each tile: strongest patch (crop) | image (green: ground-truth defect) | activation over the image "
               f"(white line: half of max {vmax:.3g}); cyan box: the patch")
    fig.get_layout_engine().set(rect=(0, 0.03, 1, 1))
    fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=7, color="0.3")
    return fig


def atom_gallery_png(store: Store, sae_id: str, atom: int, rows: Any, out_path: str | os.PathLike,
                     image_size: int | None = None, cols: int = 4, *, role: str | None = None,
                     coefficient: float | None = None, title: str | None = None) -> Path:
    """Draw ``rows`` (from :func:`top_patches`) as (patch crop, image, activation over image) triples; returns the path.

    ``image_size`` overrides the extraction square side (default: read from patch_tokens, else grid * 16 px).
    Every tile shows the strongest patch, the image itself with its ground-truth defect outlined in green (when
    it has a mask) and, next to it, the atom's activation map over the image: a semi-transparent heat (opacity
    grows with the activation, so silent regions stay untouched) with a white line at half the gallery maximum.
    One colour scale is shared by all tiles and stated by the labelled colour bar; the crop's title holds the
    patch's activation and category. The title is short: ``role`` (e.g. ``"anomaly-guide"``) and
    ``coefficient`` (the guide's weight on the atom) when the caller knows them, and a short SAE label
    (``"SAE C=1024 k=16"``), never the long sae_id; ``title`` replaces it.
    """
    fig = atom_gallery_figure(store, sae_id, atom, rows, image_size, cols, role=role, coefficient=coefficient,
                              title=title)
    return save_figure(fig, out_path)


def atom_stats_png(stats: Any, out_path: str | os.PathLike, title: str | None = None) -> Path:
    """Overview of an SAE's atoms from :func:`atom_stats`: log10 firing frequency vs category entropy.

    Lower left: rare, category-specific atoms; upper right: frequent, shared ones (texture, background).
    Colour: share of each atom's mass on anomalous images, the atoms an anomaly detector leans on. Margins
    show both distributions. The corner counts the atoms silent on the encoded images (``count == 0``) and,
    apart from them, the atoms dead by the one definition stored with the SAE (not fired in the last
    ``dead_tokens`` training tokens; ``stats.attrs["training_dead"]``) when the SAE has that record.
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
    silent = int((df["count"] == 0).sum())
    lines = [f"{len(df)} atoms; never fired on the encoded images: {silent} ({silent / max(len(df), 1):.1%})"]
    training = getattr(df, "attrs", {}).get("training_dead")
    if training:
        lines.append(f"dead in training (not fired in the last {training['dead_tokens']:,} tokens): "
                     f"{training['n_dead']} ({training['dead_fraction']:.1%})")
    ax.text(0.01, 0.99, "\n".join(lines), transform=ax.transAxes, va="top", fontsize=7.5)
    ax_top.tick_params(labelbottom=False)
    ax_right.tick_params(labelleft=False)
    ax_top.set_ylabel("atoms", fontsize=8)
    ax_right.set_xlabel("atoms", fontsize=8)
    return save_figure(fig, out_path)


__all__ = ["atom_gallery_figure", "atom_gallery_png", "atom_stats_png", "gallery_title", "upsample_bilinear"]
