"""Image-score pooling sweeps: image AUROC/AP of log-sum-exp pooling ``lse:τ`` over a range of τ, computed from
anomaly maps that are already in memory (no token is re-scored), with max pooling as the τ -> 0 reference.

Drawn with matplotlib's object API on an Agg canvas (no pyplot), like :mod:`spg_dist.viz.atoms`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from spg_dist.evaluation import image_ap, image_auroc
from spg_dist.guides import image_scores
from spg_dist.viz.figures import save_figure

SWEEP_METRICS = ("image_auroc", "image_ap")


def parse_taus(spec: str | Sequence[float] | None) -> list[float] | None:
    """``"0.01,0.05,0.1"`` (or a sequence) -> sorted unique positive floats; ``None``/empty -> ``None``."""
    if spec is None:
        return None
    items = [s for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    try:
        taus = sorted({float(t) for t in items})
    except ValueError as e:
        raise ValueError(f"taus {spec!r}: expected a comma-separated list of numbers ({e})") from None
    bad = [t for t in taus if not (t > 0 and math.isfinite(t))]
    if bad:
        raise ValueError(f"taus {spec!r}: every tau must be a finite number > 0 (got {bad})")
    return taus or None


def pooled_scores(maps: np.ndarray, pooling: str) -> np.ndarray:
    """[N, H, W] maps -> [N] image scores (float64, so that a tiny τ stays numerically at max pooling)."""
    t = torch.from_numpy(np.asarray(maps, np.float64))
    return image_scores(t, pooling).numpy()


def tau_sweep(per_category: Mapping[str, tuple[np.ndarray, np.ndarray]], taus: Sequence[float]) -> pd.DataFrame:
    """``{category: (labels [N], maps [N, H, W])}`` -> one row per τ (ascending).

    Columns: ``tau``, ``pooling`` (``lse:τ``), ``image_auroc`` and ``image_ap`` (unweighted means over categories),
    ``max_image_auroc`` / ``max_image_ap`` (the max-pooling reference, the same on every row), and
    ``<category>/image_auroc`` / ``<category>/image_ap`` per category.
    """
    taus = parse_taus(taus)
    if not taus:
        raise ValueError("tau_sweep needs at least one tau")
    cats = sorted(per_category)
    if not cats:
        raise ValueError("tau_sweep needs at least one category")

    def metrics(pooling: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for cat in cats:
            labels, maps = per_category[cat]
            s = pooled_scores(maps, pooling)
            out[f"{cat}/image_auroc"] = image_auroc(np.asarray(labels), s)
            out[f"{cat}/image_ap"] = image_ap(np.asarray(labels), s)
        for m in SWEEP_METRICS:
            out[m] = float(np.mean([out[f"{c}/{m}"] for c in cats]))
        return out

    ref = metrics("max")
    rows = []
    for tau in taus:
        pooling = f"lse:{tau!r}"
        r = metrics(pooling)
        rows.append({"tau": tau, "pooling": pooling, **{m: r[m] for m in SWEEP_METRICS},
                     **{f"max_{m}": ref[m] for m in SWEEP_METRICS},
                     **{f"{c}/{m}": r[f"{c}/{m}"] for c in cats for m in SWEEP_METRICS}})
    return pd.DataFrame(rows)


def tau_sweep_png(sweep: pd.DataFrame, out_path: str | os.PathLike, title: str | None = None) -> Path:
    """Mean image AUROC and AP against τ (log axis), max pooling as dashed reference lines; returns the path."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    tau = sweep["tau"].to_numpy(float)
    for m, label, color in (("image_auroc", "image AUROC", "tab:blue"), ("image_ap", "image AP", "tab:orange")):
        ax.plot(tau, sweep[m].to_numpy(float), "o-", color=color, label=f"{label} (lse:τ)")
        if f"max_{m}" in sweep:
            ax.axhline(float(sweep[f"max_{m}"].iloc[0]), color=color, ls="--", lw=1, label=f"{label} (max, τ→0)")
    ax.set_xscale("log")
    ax.set_xlabel("τ (log-sum-exp temperature)")
    ax.set_ylabel("mean over categories")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or "image AUROC / AP against τ")
    fig.tight_layout()
    return save_figure(fig, out_path)


__all__ = ["SWEEP_METRICS", "parse_taus", "pooled_scores", "tau_sweep", "tau_sweep_png"]
