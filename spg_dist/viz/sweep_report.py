"""Sweep reports: the paper's ablation figures and a summary table from a DataFrame of finished sweep trials.

Input: one row per (trial, target category ``'mean'``) with the columns ``spg sweep report`` builds
(``trial_id, detector, backbone, token, layer, C, k, sparsifier, guide, nonneg, k_g, beta_l1, pooling, tau,
direction, seed, active_total`` and the four metrics, fractions in [0, 1], NaN allowed). Nothing here touches
the store or Ray: DataFrame in, CSV / Markdown / PNG out.

What is drawn (every figure: mean over seeds, values in %, labelled axes, short title + one subtitle line):

* :func:`summary_table` -- mean (and std when some cell has > 1 seed) of the metrics per
  (direction, detector, backbone, C, k, guide, pooling); ``token``, ``layer`` and ``sparsifier`` join the key
  only when they vary in the data, so that different settings are never silently averaged together.
* :func:`ck_heatmaps` (paper Fig. 2) -- one PNG per direction, ``ck_heatmap__<direction>.png``, four panels
  (one per metric) of C (rows) x k (columns), each with its own labelled colorbar and the values in the cells.
* :func:`tau_curve` (Fig. 3) -- ``tau_curve.png``: image AUROC and AP against τ of ``lse:τ`` pooling (log x),
  one line per direction, max pooling dashed as the τ -> 0 reference.
* :func:`backbone_bars` (Fig. 4) -- ``backbone_bars.png``: the four metrics per backbone, one panel per direction.
* :func:`sparsity_curve` (Fig. S1) -- one PNG per direction, ``sparsity_curve__<direction>.png``: metrics
  against the total number of non-zero guide coefficients (log x), TopK-k_g points connected, ReLU+β apart.

**Which trials a figure uses.** A figure varies one thing (C x k, τ, backbone, guide sparsity); every other
setting that still takes several values in that direction is *fixed*, never averaged: ``pooling`` to ``max``
when present, the detector to ``spg`` when present, and anything else (guide, backbone, C, k, token, layer,
sparsifier, ...) to the value that covers the most points of the figure's x variable, ties broken by row count,
then by name. Each such choice is written in the figure's subtitle (e.g. ``guide relu β=0.01 (most common of 2)``),
and the matrix / points a figure draws are exposed (:func:`ck_matrix`, :func:`tau_points`,
:func:`backbone_table`, :func:`sparsity_points`) so a test or a notebook sees exactly the plotted numbers.

A figure whose x variable has fewer than 2 values (one τ, one backbone, one (C, k) cell, one sparsity level) is
skipped with a note; :func:`write_report` collects these notes and never raises for them.
"""

from __future__ import annotations

import math
import os
import re
import textwrap
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from spg_dist.viz.figures import save_figure

# Same names and order as spg_dist.evaluation.metrics.METRICS (not imported: that pulls in sklearn).
METRICS: tuple[str, ...] = ("image_auroc", "image_ap", "pixel_auroc", "aupro")
METRIC_LABELS: dict[str, str] = {"image_auroc": "image AUROC", "image_ap": "image AP",
                                 "pixel_auroc": "pixel AUROC", "aupro": "AUPRO"}
GROUP_KEYS: tuple[str, ...] = ("direction", "detector", "backbone", "C", "k", "guide", "pooling")
# Full key order of the summary; token / layer / sparsifier are only used when they vary.
_SUMMARY_ORDER: tuple[str, ...] = ("direction", "detector", "backbone", "token", "layer", "C", "k", "sparsifier",
                                   "guide", "pooling")
_OPTIONAL_KEYS: tuple[str, ...] = ("token", "layer", "sparsifier")
_NUMERIC = ("C", "k", "k_g", "layer", "seed", "beta_l1", "tau", "active_total") + METRICS
_TEXT = ("trial_id", "detector", "backbone", "token", "sparsifier", "guide", "nonneg", "pooling", "direction")
_SUMMARY_REQUIRED = GROUP_KEYS + ("seed",) + METRICS
SPG = "spg"
_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
            "tab:olive", "tab:cyan")

FIGURES: tuple[str, ...] = ("ck_heatmaps", "tau_curve", "backbone_bars", "sparsity_curve")
_FIGURE_REQUIRED: dict[str, tuple[str, ...]] = {
    "ck_heatmaps": ("direction", "detector", "C", "k", "seed") + METRICS,
    "tau_curve": ("direction", "pooling", "seed", "image_auroc", "image_ap"),
    "backbone_bars": ("direction", "backbone", "seed") + METRICS,
    "sparsity_curve": ("direction", "detector", "guide", "active_total", "seed") + METRICS,
}


# ----------------------------------------------------------------------------------------------- input checks


def _check(df: Any, required: Iterable[str], what: str) -> None:
    """A clear ``ValueError`` for no DataFrame, no rows, or missing columns (named)."""
    if df is None:
        raise ValueError(f"{what}: no DataFrame of finished trials was given (got None)")
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{what}: expected a pandas DataFrame of finished trials, got {type(df).__name__}")
    if len(df) == 0:
        raise ValueError(f"{what}: the DataFrame of finished trials is empty (no rows): nothing to report; "
                         "is the sweep id right and has any trial finished?")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: the trials DataFrame lacks column(s) {missing} "
                         f"(it has {sorted(map(str, df.columns))})")


def _tau_of(pooling: str) -> float:
    s = str(pooling)
    if s == "max":
        return 0.0
    if s.startswith("lse:"):
        try:
            return float(s[4:])
        except ValueError:
            return math.nan
    return math.nan


def _prepare(df: pd.DataFrame) -> pd.DataFrame:
    """A copy with numeric columns as floats, text columns as str ('' for missing), τ filled in from the pooling."""
    d = df.copy()
    for c in _NUMERIC:
        if c in d.columns:
            d[c] = pd.to_numeric(d[c], errors="coerce").astype(float)
    for c in _TEXT:
        if c in d.columns:
            d[c] = d[c].astype(object).where(d[c].notna(), "").astype(str)
    if "pooling" in d.columns:
        parsed = d["pooling"].map(_tau_of).astype(float)
        d["tau"] = d["tau"].where(d["tau"].notna(), parsed) if "tau" in d.columns else parsed
    return d


def _eq(s: pd.Series, v: Any) -> pd.Series:
    """Element-wise ``s == v`` where NaN equals NaN."""
    if isinstance(v, float) and math.isnan(v):
        return s.isna()
    return s == v


def _uniques(s: pd.Series) -> list[Any]:
    vals = list(pd.unique(s))
    if any(isinstance(v, float) and math.isnan(v) for v in vals):
        vals = [v for v in vals if not (isinstance(v, float) and math.isnan(v))] + [math.nan]
    return sorted(vals, key=lambda v: (isinstance(v, float) and math.isnan(v), _sort_key(v)))


def _sort_key(v: Any) -> tuple:
    if isinstance(v, (int, float, np.integer, np.floating)):
        return (0, float(v), "")
    return (1, 0.0, str(v))


def _fmt(v: Any) -> str:
    """Settings as a reader wants them: 4096 not 4096.0, '–' for missing."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return "–"
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):g}"
    return str(v) if str(v) != "" else "–"


def _setting(key: str, v: Any) -> str:
    return f"{key}={_fmt(v)}" if key in ("C", "k", "layer", "k_g") else f"{key} {_fmt(v)}"


def _slug(direction: str) -> str:
    s = str(direction).replace("->", " to ").replace("→", " to ")
    return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_") or "direction"


def _title(fig: Figure, title: str, lines: Sequence[str] = ()) -> None:
    """Short title, then the subtitle lines (selection notes) wrapped to the figure's width."""
    width = max(40, int(fig.get_figwidth() * 12))
    sub = [textwrap.fill(line, width) for line in lines if line]
    fig.suptitle("\n".join([title, *sub]), fontsize=10 if not sub else 9)


def _pct(v: Any) -> str:
    return "–" if v is None or pd.isna(v) else f"{100 * float(v):.1f}"


# ----------------------------------------------------------------------------------- fixing the other settings


def _choose(df: pd.DataFrame, keys: Sequence[str], cover: Sequence[str] = (),
            prefer: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Fix, key by key, every setting that takes several values in ``df``.

    The preferred value when present (no note beyond ``(of n)``), else the value whose rows cover the most
    distinct ``cover`` tuples (the figure's x variable), then the most rows, then the first by name. Returns the
    choices (single-valued keys pinned too) and the subtitle notes (only for keys that had a choice).
    """
    prefer = dict(prefer or {})
    choice: dict[str, Any] = {}
    notes: list[str] = []
    d = df
    for key in keys:
        if key not in d.columns or len(d) == 0:
            continue
        vals = _uniques(d[key])
        if len(vals) == 1:
            choice[key] = vals[0]  # pinned without a note, so that _apply keeps e.g. a reference on the same setting
        if len(vals) <= 1:
            continue
        if key in prefer and any(_eq(d[key], prefer[key])):
            best, why = prefer[key], f"of {len(vals)}"
        else:
            def score(v: Any) -> tuple[int, int]:
                rows = d[_eq(d[key], v)]
                n_cover = len(rows[list(cover)].drop_duplicates()) if cover else 0
                return n_cover, len(rows)

            best = max(vals, key=score)  # max keeps the first of equals: sorted order breaks ties
            why = f"most common of {len(vals)}"
        choice[key] = best
        notes.append(f"{_setting(key, best)} ({why})")
        d = d[_eq(d[key], best)]
    return choice, notes


def _apply(df: pd.DataFrame, choice: Mapping[str, Any]) -> pd.DataFrame:
    mask = pd.Series(True, index=df.index)
    for key, v in choice.items():
        if key in df.columns:
            mask &= _eq(df[key], v)
    return df[mask]


def _seed_stats(df: pd.DataFrame, keys: Sequence[str], values: Sequence[str]) -> pd.DataFrame:
    """Mean over trials per (keys, seed), then mean / std (ddof 1) over seeds per keys; column ``n_seeds``."""
    keys = list(keys)
    values = [v for v in values if v in df.columns]
    per_seed = df.groupby(keys + ["seed"], dropna=False, sort=True)[values].mean().reset_index()
    g = per_seed.groupby(keys, dropna=False, sort=True)
    out = g[values].mean()
    std = g[values].std(ddof=1)
    out = out.join(std.add_suffix("_std"))
    out.insert(0, "n_seeds", g["seed"].size().astype(int))
    return out


def _directions(df: pd.DataFrame) -> list[str]:
    return sorted(df["direction"].unique(), key=str)


# ------------------------------------------------------------------------------------------------ summary table


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean of the four metrics (fractions) per (direction, detector, backbone, C, k, guide, pooling).

    Index: those keys (C and k as nullable integers; ``token`` / ``layer`` / ``sparsifier`` inserted when they
    vary). Columns: ``n_seeds``, then each metric, then ``<metric>_std`` (std over seeds, ddof 1; NaN for a
    single seed) when some row has more than one seed. All columns numeric: ready for ``to_csv`` and
    :func:`spg_dist.stages.evaluate.markdown_table`; :func:`summary_markdown` gives the "mean ± std" view in %.
    """
    _check(df, _SUMMARY_REQUIRED, "summary_table")
    d = _prepare(df)
    # an optional key joins the index only when it takes several values inside one group of GROUP_KEYS
    keys = [k for k in _SUMMARY_ORDER if k in GROUP_KEYS or (
        k in d.columns and int(d.groupby(list(GROUP_KEYS), dropna=False)[k].nunique(dropna=False).max()) > 1)]
    for k in ("C", "k", "layer"):
        if k in keys:
            col = d[k]
            if bool(((col.dropna() % 1) == 0).all()):
                d[k] = col.round().astype("Int64")
    stats = _seed_stats(d, keys, METRICS)
    cols = ["n_seeds"] + list(METRICS)
    if int(stats["n_seeds"].max()) > 1:
        cols += [f"{m}_std" for m in METRICS]
    return stats[cols]


def summary_markdown(summary: pd.DataFrame) -> str:
    """A pipe table of :func:`summary_table` in %: ``mean ± std`` (1 decimal) when several seeds, else ``mean``."""
    names = [str(n) for n in summary.index.names]
    head = names + ["seeds"] + [f"{METRIC_LABELS[m]} (%)" for m in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] * len(names) + ["---:"] * (len(head) - len(names))) + "|"]
    for idx, r in summary.iterrows():
        keys = list(idx) if isinstance(idx, tuple) else [idx]
        cells = [_fmt(None if k is pd.NA else k) for k in keys] + [str(int(r["n_seeds"]))]
        for m in METRICS:
            s = f"{m}_std"
            cell = _pct(r[m])
            if s in r.index and r["n_seeds"] > 1 and not pd.isna(r[s]) and not pd.isna(r[m]):
                cell += f" ± {100 * float(r[s]):.1f}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------- Fig. 2: C x k


def _spg_rows(d: pd.DataFrame) -> pd.DataFrame:
    return d[d["detector"] == SPG] if "detector" in d.columns else d


def ck_selection(df: pd.DataFrame, direction: str) -> tuple[pd.DataFrame, list[str]]:
    """The SPG trials of ``direction`` that the C x k heatmap averages (over seeds), and the subtitle notes."""
    _check(df, _FIGURE_REQUIRED["ck_heatmaps"], "ck_heatmaps")
    d = _prepare(df)
    d = _spg_rows(d[d["direction"] == direction])
    d = d[d["C"].notna() & d["k"].notna()]
    choice, notes = _choose(d, ("pooling", "guide", "backbone", "token", "layer", "sparsifier"), cover=("C", "k"),
                            prefer={"pooling": "max"})
    return _apply(d, choice), notes


def ck_matrix(df: pd.DataFrame, direction: str, metric: str) -> pd.DataFrame:
    """Mean ``metric`` (fraction) over seeds, C (rows, ascending) x k (columns, ascending); NaN = not run.

    Exactly the matrix :func:`ck_heatmaps` draws (times 100).
    """
    if metric not in METRICS:
        raise ValueError(f"ck_matrix: metric {metric!r} is not one of {list(METRICS)}")
    sel, _ = ck_selection(df, direction)
    if len(sel) == 0:
        return pd.DataFrame(dtype=float)
    stats = _seed_stats(sel, ["C", "k"], [metric])
    mat = stats[metric].unstack("k").sort_index().sort_index(axis=1)
    mat.index = pd.Index([int(c) for c in mat.index], name="C")
    mat.columns = pd.Index([int(k) for k in mat.columns], name="k")
    return mat.astype(float)


def _annotated_heatmap(fig: Figure, ax: Any, mat: pd.DataFrame, label: str) -> None:
    vals = mat.to_numpy(float) * 100
    if not np.isfinite(vals).any():
        ax.text(0.5, 0.5, f"no {label} values", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label, fontsize=10)
        return
    cmap = colormaps["viridis"].with_extremes(bad="0.85")
    im = ax.imshow(np.ma.masked_invalid(vals), cmap=cmap, aspect="auto", interpolation="nearest")
    cb = fig.colorbar(im, ax=ax, shrink=0.9)
    cb.set_label(f"{label} (%)", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    for i in range(vals.shape[0]):
        for j in range(vals.shape[1]):
            v = vals[i, j]
            if np.isfinite(v):
                colour = "white" if im.norm(v) < 0.55 else "black"
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8, color=colour)
            else:
                ax.text(j, i, "–", ha="center", va="center", fontsize=8, color="0.4")
    ax.set_xticks(range(vals.shape[1]), [str(k) for k in mat.columns], fontsize=8)
    ax.set_yticks(range(vals.shape[0]), [str(c) for c in mat.index], fontsize=8)
    ax.set_xlabel("k (active latents per token)", fontsize=8)
    ax.set_ylabel("C (dictionary size, atoms)", fontsize=8)
    ax.set_title(label, fontsize=10)


def ck_heatmap_figure(df: pd.DataFrame, direction: str) -> Figure:
    """The 2 x 2 panel figure (one panel per metric) for one direction; each panel shows :func:`ck_matrix` in %."""
    sel, notes = ck_selection(df, direction)
    n_seeds = sel["seed"].nunique(dropna=False) if len(sel) else 0
    mats = {m: ck_matrix(df, direction, m) for m in METRICS}
    shape = max((m.shape for m in mats.values()), default=(1, 1))
    w = 2 * (0.8 * max(shape[1], 1) + 2.2)
    h = 2 * (0.55 * max(shape[0], 1) + 1.5) + 0.5
    fig = Figure(figsize=(max(w, 8.0), max(h, 6.0)), layout="constrained")
    sub = f"SPG, mean over {n_seeds} seed{'s' if n_seeds != 1 else ''}"
    if notes:
        sub += "; " + ", ".join(notes)
    _title(fig, f"C × k: {direction}", [sub])
    for i, m in enumerate(METRICS):
        _annotated_heatmap(fig, fig.add_subplot(2, 2, i + 1), mats[m], METRIC_LABELS[m])
    return fig


def ck_heatmaps(df: pd.DataFrame, out_dir: str | os.PathLike, notes: list[str] | None = None) -> list[Path]:
    """Paper Fig. 2: one PNG per direction (``ck_heatmap__<direction>.png``) with four C x k panels.

    A direction with no SPG trial or with a single (C, k) cell is skipped; the reason goes to ``notes``.
    """
    _check(df, _FIGURE_REQUIRED["ck_heatmaps"], "ck_heatmaps")
    out: list[Path] = []
    for direction in _directions(_prepare(df)):
        sel, _ = ck_selection(df, direction)
        n_c, n_k = sel["C"].nunique(), sel["k"].nunique()
        if len(sel) == 0 or (n_c < 2 and n_k < 2):
            _note(notes, f"ck_heatmaps: {direction}: skipped, needs ≥2 values of C or of k among SPG trials "
                         f"(has {n_c} C, {n_k} k)")
            continue
        out.append(save_figure(ck_heatmap_figure(df, direction), Path(out_dir) / f"ck_heatmap__{_slug(direction)}.png"))
    return out


def _note(notes: list[str] | None, text: str) -> None:
    if notes is not None:
        notes.append(text)


# ------------------------------------------------------------------------------------------------ Fig. 3: τ


def tau_points(df: pd.DataFrame, direction: str) -> tuple[pd.DataFrame, pd.Series | None, list[str]]:
    """For ``lse:τ`` pooling in ``direction``: (curve, max reference, notes).

    curve: index ``tau`` (ascending), columns ``n_seeds``, ``image_auroc``, ``image_ap`` and their ``_std``
    (fractions, mean over seeds); max reference: the same metrics with ``max`` pooling for the same fixed
    settings (``None`` when no such trial). Other settings are fixed as the module docstring says.
    """
    _check(df, _FIGURE_REQUIRED["tau_curve"], "tau_curve")
    d = _prepare(df)
    d = d[d["direction"] == direction]
    lse = d[d["pooling"].str.startswith("lse:") & d["tau"].notna()]
    choice, notes = _choose(lse, ("detector", "backbone", "token", "layer", "C", "k", "sparsifier", "guide"),
                            cover=("tau",), prefer={"detector": SPG})
    lse = _apply(lse, choice)
    mets = ("image_auroc", "image_ap")
    curve = _seed_stats(lse, ["tau"], mets) if len(lse) else pd.DataFrame(columns=["n_seeds", *mets])
    ref_rows = _apply(d[d["pooling"] == "max"], choice)
    ref = None
    if len(ref_rows):
        ref = _seed_stats(ref_rows.assign(_all=0), ["_all"], mets).iloc[0]
    return curve, ref, notes


def tau_curve(df: pd.DataFrame, out_dir: str | os.PathLike, notes: list[str] | None = None) -> list[Path]:
    """Paper Fig. 3: ``tau_curve.png``, image AUROC (left) and AP (right) against τ, one line per direction.

    Shaded: ± std over seeds; dashed: max pooling (τ -> 0) in the direction's colour. Directions with fewer than
    2 values of τ are left out (noted); with none left, no file is written.
    """
    _check(df, _FIGURE_REQUIRED["tau_curve"], "tau_curve")
    series = []
    for direction in _directions(_prepare(df)):
        curve, ref, sel_notes = tau_points(df, direction)
        if len(curve) < 2:
            _note(notes, f"tau_curve: {direction}: skipped, needs ≥2 values of τ with lse pooling (has {len(curve)})")
            continue
        series.append((direction, curve, ref, sel_notes))
    if not series:
        return []
    fig = Figure(figsize=(10.0, 4.4), layout="constrained")
    _title(fig, "Image score vs log-sum-exp τ", [f"{dirn}: {', '.join(n)}" for dirn, _, _, n in series if n])
    for p, m in enumerate(("image_auroc", "image_ap")):
        ax = fig.add_subplot(1, 2, p + 1)
        for i, (direction, curve, ref, _) in enumerate(series):
            colour = _COLOURS[i % len(_COLOURS)]
            tau = curve.index.to_numpy(float)
            y = curve[m].to_numpy(float) * 100
            ax.plot(tau, y, "o-", color=colour, label=f"{direction} (lse:τ)")
            sd = curve.get(f"{m}_std")
            if sd is not None and (curve["n_seeds"] > 1).any():
                s = np.nan_to_num(sd.to_numpy(float) * 100)
                ax.fill_between(tau, y - s, y + s, color=colour, alpha=0.15, linewidth=0)
            if ref is not None and not pd.isna(ref[m]):
                ax.axhline(float(ref[m]) * 100, color=colour, ls="--", lw=1.2, label=f"{direction} (max, τ→0)")
        ax.set_xscale("log")
        ax.set_xlabel("τ (log-sum-exp temperature, log scale)")
        ax.set_ylabel(f"{METRIC_LABELS[m]} (%)")
        ax.set_title(METRIC_LABELS[m], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if p == 0:
            ax.legend(fontsize=7, loc="best")
    return [save_figure(fig, Path(out_dir) / "tau_curve.png")]


# ------------------------------------------------------------------------------------------- Fig. 4: backbones


def backbone_table(df: pd.DataFrame, direction: str) -> tuple[pd.DataFrame, list[str]]:
    """Per backbone in ``direction``: ``n_seeds``, the four metrics and their ``_std`` (fractions), plus notes.

    Detector (``spg`` preferred), pooling (``max`` preferred), guide, C, k and sparsifier are fixed across
    backbones (choosing values every backbone has); token and layer are then fixed per backbone (most common).
    """
    _check(df, _FIGURE_REQUIRED["backbone_bars"], "backbone_bars")
    d = _prepare(df)
    d = d[d["direction"] == direction]
    choice, notes = _choose(d, ("detector", "pooling", "guide", "C", "k", "sparsifier"), cover=("backbone",),
                            prefer={"detector": SPG, "pooling": "max"})
    d = _apply(d, choice)
    parts = []
    for b in _uniques(d["backbone"]):
        rows = d[_eq(d["backbone"], b)]
        ch, n = _choose(rows, ("token", "layer"))
        parts.append(_apply(rows, ch))
        notes += [f"{b}: {x}" for x in n]
    sel = pd.concat(parts) if parts else d
    table = _seed_stats(sel, ["backbone"], METRICS) if len(sel) else pd.DataFrame()
    return table, notes


def backbone_bars(df: pd.DataFrame, out_dir: str | os.PathLike, notes: list[str] | None = None) -> list[Path]:
    """Paper Fig. 4: ``backbone_bars.png``, grouped bars (metric groups, one bar per backbone), one panel per
    direction, values in % on the bars, ± std over seeds as error bars. Directions with < 2 backbones are noted."""
    _check(df, _FIGURE_REQUIRED["backbone_bars"], "backbone_bars")
    panels = []
    for direction in _directions(_prepare(df)):
        table, sel_notes = backbone_table(df, direction)
        if len(table) < 2:
            _note(notes, f"backbone_bars: {direction}: skipped, needs ≥2 backbones (has {len(table)})")
            continue
        panels.append((direction, table, sel_notes))
    if not panels:
        return []
    n_b = max(len(t) for _, t, _ in panels)
    fig = Figure(figsize=(max(5.5, 1.0 + 0.45 * n_b * len(METRICS)) * len(panels), 4.8), layout="constrained")
    _title(fig, "Metrics per backbone", [f"{dirn}: {', '.join(n)}" for dirn, _, n in panels if n])
    backbones = sorted({b for _, t, _ in panels for b in t.index}, key=str)
    colour = {b: _COLOURS[i % len(_COLOURS)] for i, b in enumerate(backbones)}
    ax0 = None
    for p, (direction, table, _) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), p + 1, sharey=ax0)
        ax0 = ax0 or ax
        x = np.arange(len(METRICS))
        width = 0.8 / len(table)
        for i, b in enumerate(table.index):
            y = table.loc[b, list(METRICS)].to_numpy(float) * 100
            err = None
            if table.loc[b, "n_seeds"] > 1:
                err = np.nan_to_num(table.loc[b, [f"{m}_std" for m in METRICS]].to_numpy(float) * 100)
            pos = x - 0.4 + width * (i + 0.5)
            bars = ax.bar(pos, np.nan_to_num(y), width * 0.92, yerr=err, capsize=2, color=colour[b],
                          label=f"{b} ({int(table.loc[b, 'n_seeds'])} seed{'s' if table.loc[b, 'n_seeds'] != 1 else ''})")
            for j, (rect, v) in enumerate(zip(bars, y)):
                top = (0 if np.isnan(v) else v) + (0 if err is None else err[j])
                ax.text(rect.get_x() + rect.get_width() / 2, top + 1.0,
                        "–" if np.isnan(v) else f"{v:.1f}", ha="center", va="bottom", fontsize=7,
                        rotation=90 if len(table) > 3 else 0)
        ax.set_xticks(x, [METRIC_LABELS[m] for m in METRICS], fontsize=8)
        ax.set_xlabel("metric (mean over target categories)")
        ax.set_ylabel("score (%)")
        ax.set_ylim(0, 112)
        ax.set_title(direction, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right", title="backbone", title_fontsize=7)
    return [save_figure(fig, Path(out_dir) / "backbone_bars.png")]


# --------------------------------------------------------------------------------------- Fig. S1: guide sparsity


def _guide_kind(row: Mapping[str, Any]) -> str:
    nonneg = str(row.get("nonneg", "") or "")
    if nonneg in ("topk", "relu"):
        return nonneg
    g = str(row.get("guide", "")).lower()
    return "topk" if g.startswith("topk") else "relu" if g.startswith("relu") else "other"


def sparsity_points(df: pd.DataFrame, direction: str) -> tuple[pd.DataFrame, list[str]]:
    """Per guide setting of the SPG trials in ``direction``: ``kind`` (topk | relu | other), ``k_g``,
    ``beta_l1``, ``active_total`` (mean over seeds), ``n_seeds``, the metrics and their ``_std``; sorted by
    kind then ``active_total``. Other settings fixed (pooling ``max`` preferred), with the notes."""
    _check(df, _FIGURE_REQUIRED["sparsity_curve"], "sparsity_curve")
    d = _prepare(df)
    d = _spg_rows(d[d["direction"] == direction])
    d = d[d["active_total"].notna()]
    choice, notes = _choose(d, ("pooling", "backbone", "C", "k", "token", "layer", "sparsifier"), cover=("guide",),
                            prefer={"pooling": "max"})
    d = _apply(d, choice)
    if len(d) == 0:
        return pd.DataFrame(columns=["guide", "kind", "k_g", "beta_l1", "active_total", "n_seeds", *METRICS]), notes
    stats = _seed_stats(d, ["guide"], ("active_total",) + METRICS).reset_index()
    first = d.drop_duplicates("guide").set_index("guide")
    stats["kind"] = [_guide_kind(first.loc[g]) for g in stats["guide"]]
    for c in ("k_g", "beta_l1"):
        stats[c] = [first.loc[g, c] if c in first.columns else math.nan for g in stats["guide"]]
    stats = stats.sort_values(["kind", "active_total"], kind="stable").reset_index(drop=True)
    lead = ["guide", "kind", "k_g", "beta_l1", "active_total", "n_seeds"]
    return stats[lead + [c for c in stats.columns if c not in lead]], notes


def sparsity_curve(df: pd.DataFrame, out_dir: str | os.PathLike, notes: list[str] | None = None) -> list[Path]:
    """Paper Fig. S1: per direction ``sparsity_curve__<direction>.png``, four panels (one per metric) against
    the total of non-zero guide coefficients (normal + anomaly, log x). TopK guides: circles joined in order of
    sparsity, labelled k_g; ReLU + L1 guides: stars, labelled β. Directions with < 2 sparsity levels are noted."""
    _check(df, _FIGURE_REQUIRED["sparsity_curve"], "sparsity_curve")
    out: list[Path] = []
    for direction in _directions(_prepare(df)):
        pts, sel_notes = sparsity_points(df, direction)
        n_x = pts["active_total"].nunique() if len(pts) else 0
        if n_x < 2:
            _note(notes, f"sparsity_curve: {direction}: skipped, needs ≥2 values of active_total among SPG trials "
                         f"(has {n_x})")
            continue
        fig = Figure(figsize=(10.0, 7.4), layout="constrained")
        n_seeds = int(pts["n_seeds"].max())
        sub = f"SPG, mean over {n_seeds} seed{'s' if n_seeds != 1 else ''}"
        if sel_notes:
            sub += "; " + ", ".join(sel_notes)
        _title(fig, f"Guide sparsity: {direction}", [sub])
        styles = {"topk": ("o-", "tab:blue", "TopK (k_g)"), "relu": ("*", "tab:red", "ReLU + L1 (β)"),
                  "other": ("s", "tab:gray", "other guide")}
        for i, m in enumerate(METRICS):
            ax = fig.add_subplot(2, 2, i + 1)
            for kind, (fmt, colour, label) in styles.items():
                p = pts[pts["kind"] == kind]
                if not len(p):
                    continue
                x, y = p["active_total"].to_numpy(float), p[m].to_numpy(float) * 100
                yerr = None
                if (p["n_seeds"] > 1).any():
                    yerr = np.nan_to_num(p[f"{m}_std"].to_numpy(float) * 100)
                ax.errorbar(x, y, yerr=yerr, fmt=fmt, color=colour, label=label, capsize=2,
                            markersize=11 if kind == "relu" else 6, lw=1.3)
                for _, r in p.iterrows():
                    if pd.isna(r[m]):
                        continue
                    txt = (f"k_g={_fmt(r['k_g'])}" if kind == "topk" and not pd.isna(r["k_g"])
                           else f"β={_fmt(r['beta_l1'])}" if kind == "relu" and not pd.isna(r["beta_l1"])
                           else str(r["guide"]))
                    ax.annotate(txt, (r["active_total"], 100 * r[m]), textcoords="offset points", xytext=(4, 4),
                                fontsize=7, color=colour)
            ax.set_xscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
            ax.tick_params(axis="x", which="both", labelsize=7)
            ax.margins(x=0.12, y=0.1)
            ax.set_xlabel("non-zero guide coefficients, normal + anomaly (log scale)", fontsize=8)
            ax.set_ylabel(f"{METRIC_LABELS[m]} (%)", fontsize=8)
            ax.set_title(METRIC_LABELS[m], fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if i == 0:
                ax.legend(fontsize=7, loc="best")
        out.append(save_figure(fig, Path(out_dir) / f"sparsity_curve__{_slug(direction)}.png"))
    return out


# ---------------------------------------------------------------------------------------------------- report


_FIGURE_FUNCS = {"ck_heatmaps": ck_heatmaps, "tau_curve": tau_curve, "backbone_bars": backbone_bars,
                 "sparsity_curve": sparsity_curve}


def write_report(df: pd.DataFrame, out_dir: str | os.PathLike, title: str) -> dict[str, Any]:
    """``summary.csv`` (fractions), ``summary.md`` (%, mean ± std) and every figure the data supports.

    Returns ``{"summary_csv": str, "summary_md": str, "figures": {name: [png paths]}, "skipped": {name: [notes]}}``
    (``skipped`` lists only figures with a note: a direction without enough x values, or a missing column).
    Raises ``ValueError`` only for input that cannot make a summary (no rows, missing key or metric columns).
    """
    _check(df, _SUMMARY_REQUIRED, "write_report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summary_table(df)
    paths: dict[str, Any] = {"summary_csv": str(out / "summary.csv"), "summary_md": str(out / "summary.md")}
    summary.to_csv(paths["summary_csv"])
    d = _prepare(df)
    n_seeds = d["seed"].nunique()
    head = (f"# {title}\n\n{d['trial_id'].nunique() if 'trial_id' in d else len(d)} finished trials, "
            f"{d['direction'].nunique()} direction(s), {n_seeds} seed(s). Values in %, mean over target categories"
            f"{', mean ± std over seeds' if n_seeds > 1 else ''}.\n\n")
    Path(paths["summary_md"]).write_text(head + summary_markdown(summary), encoding="utf-8")
    figures: dict[str, list[str]] = {}
    skipped: dict[str, list[str]] = {}
    for name, fn in _FIGURE_FUNCS.items():
        notes: list[str] = []
        missing = [c for c in _FIGURE_REQUIRED[name] if c not in df.columns]
        if missing:
            notes.append(f"{name}: skipped, the trials lack column(s) {missing}")
            figures[name] = []
        else:
            figures[name] = [str(p) for p in fn(df, out, notes=notes)]
        if notes:
            skipped[name] = notes
    paths["figures"] = figures
    paths["skipped"] = skipped
    return paths


__all__ = ["FIGURES", "GROUP_KEYS", "METRICS", "METRIC_LABELS", "backbone_bars", "backbone_table", "ck_heatmap_figure",
           "ck_heatmaps", "ck_matrix", "ck_selection", "sparsity_curve", "sparsity_points", "summary_markdown",
           "summary_table", "tau_curve", "tau_points", "write_report"]
