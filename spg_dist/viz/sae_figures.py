"""Pictures of one trained SAE from its ``sae_models`` row: the firing-frequency histogram and the training curves.

``write_sae_figures(store, sae_id, out_dir)`` (what ``spg saes show SAE_ID --out DIR`` calls) writes

* ``firing_histogram.png``: how often each latent fired during training (fires per training token, log-scale x),
  latents that are dead by the one definition (not fired in the last ``dead_tokens`` training tokens, Gao et al.
  2024, see :mod:`spg_dist.sae.tracker`) stacked in red, latents that never fired at all counted in a separate
  bar. Redrawn from the record stored with the model (``metrics["latents"]``); for a row registered before that
  record existed, from the run's final checkpoint when ``run_dir`` is readable here, else the PNG stored at
  training time is copied;
* ``training_curves.png`` when the row holds a logged curve: loss, NMSE, dead fraction and L0 against the step.

Titles carry a short SAE label (``"SAE C=1024 k=16"``, :func:`short_sae_label`), never the long sae_id. Drawn with
matplotlib's object API on an Agg canvas (no pyplot), like the other modules of :mod:`spg_dist.viz`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from spg_dist.viz.figures import save_figure

HISTOGRAM_FILE = "firing_histogram.png"
CURVES_FILE = "training_curves.png"
ALIVE_COLOUR, DEAD_COLOUR = "tab:blue", "tab:red"


def short_sae_label(row: Mapping[str, Any] | None, k: int | None = None, C: int | None = None) -> str:
    """``"SAE C=1024 k=16"`` (``" BatchTopK"`` appended for that sparsifier) from an ``sae_models`` row; ``k``/``C``
    fill in for an unregistered SAE (``row`` None)."""
    row = row or {}
    C = row.get("C", C)
    k = row.get("k", k)
    label = f"SAE C={C if C is not None else '?'} k={k if k is not None else '?'}"
    if row.get("sparsifier") not in (None, "topk"):
        label += " BatchTopK" if row["sparsifier"] == "batchtopk" else f" {row['sparsifier']}"
    return label


def sae_label(store: Any, sae_id: str, k: int | None = None) -> str:
    """:func:`short_sae_label` of ``sae_id``'s row, or of ``k`` alone when the SAE is not registered."""
    from spg_dist.store import sae_models

    try:
        return short_sae_label(sae_models.get(store, sae_id, with_weights=False))
    except sae_models.UnknownSAEError:
        return short_sae_label(None, k=k)


def _fmt_tokens(n: int | None) -> str:
    if n is None:
        return "?"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def firing_histogram_figure(hist: Mapping[str, Any], title: str | None = None) -> Figure:
    """Figure of a firing histogram as :func:`spg_dist.sae.metrics.firing_histogram_counts` /
    ``DeadLatentTracker.record`` hold it: alive latents blue, dead ones (when known) red on top, never-fired
    latents in a separate bar left of the frequency range; log-scale x, axes labelled."""
    edges = np.asarray(hist["log10_freq_edges"], np.float64)
    alive = np.asarray(hist["alive_counts"], np.float64)
    dead = np.asarray(hist.get("dead_counts", np.zeros_like(alive)), np.float64)
    C = int(hist.get("C", alive.sum() + dead.sum() + hist.get("n_never_fired", 0)))
    known = bool(hist.get("dead_known", False))
    n_dead = int(hist.get("n_dead", 0))
    never, never_dead = int(hist.get("n_never_fired", 0)), int(hist.get("n_never_fired_dead", 0))
    fig = Figure(figsize=(7, 4.2), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    x = 10 ** edges
    ax.stairs(alive, x, fill=True, color=ALIVE_COLOUR)
    if known and dead.any():
        ax.stairs(alive + dead, x, baseline=alive, fill=True, color=DEAD_COLOUR)
    handles = [Patch(color=ALIVE_COLOUR, label=f"alive ({C - n_dead if known else C - never})")]
    width = (edges[-1] - edges[0]) / max(len(alive), 1)
    if never:  # no logarithm: a bar of its own, left of the range, with a gap
        lo, hi = 10 ** (edges[0] - 4 * width), 10 ** (edges[0] - 2 * width)
        alive_never = never - never_dead
        if alive_never:
            ax.bar([lo], [alive_never], width=hi - lo, align="edge", color=ALIVE_COLOUR, hatch="//", edgecolor="white")
        if never_dead:
            ax.bar([lo], [never_dead], width=hi - lo, align="edge", bottom=alive_never, color=DEAD_COLOUR,
                   hatch="//", edgecolor="white")
        ax.annotate(f"never\nfired\n({never})", (np.sqrt(lo * hi), never), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=7)
        ax.set_xlim(lo / 10 ** width, x[-1] * 10 ** width)
    if known:
        thr = _fmt_tokens(hist.get("dead_tokens"))
        handles.append(Patch(color=DEAD_COLOUR, label=f"dead ({n_dead}, {100 * n_dead / max(C, 1):.1f}%): "
                                                      f"not fired in the last {thr} training tokens"))
    elif never:
        handles.append(Patch(facecolor=ALIVE_COLOUR, hatch="//", edgecolor="white",
                             label=f"never fired in training ({never})"))
    ax.set_xscale("log")
    if edges[-1] - edges[0] < 3:  # under three decades: label 1, 2, 5 x 10^n too
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"firing frequency (fires per training token, log scale; "
                  f"{_fmt_tokens(hist.get('tokens_observed'))} tokens observed)")
    ax.set_ylabel("latents")
    ax.set_title(f"{title + ': ' if title else ''}firing frequency of {C} latents", fontsize=10)
    ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.85)
    ax.set_ylim(0, max(float((alive + dead).max(initial=0)), float(never), 1.0) * 1.5)
    fig.tight_layout()
    return fig


_CURVE_PANELS = (("loss", "reconstruction loss", ("loss", "total_loss")),
                 ("nmse", "NMSE (fraction of variance unexplained)", ("nmse",)),
                 ("dead_fraction", "dead latents (%)", ("dead_fraction",)),
                 ("l0", "L0 (active latents per token)", ("l0",)))


def training_curves_figure(curve: Sequence[Mapping[str, Any]], title: str | None = None,
                           dead_tokens: int | None = None, final_dead: float | None = None) -> Figure:
    """2x2 panels against the optimizer step: loss (and total loss with AuxK), NMSE, dead fraction (one
    definition: not fired in the last ``dead_tokens`` tokens; ``final_dead``, the fraction stored with the model,
    as a dashed line), L0. Missing keys leave their panel empty."""
    steps = np.array([float(p.get("step", i)) for i, p in enumerate(curve)])
    fig = Figure(figsize=(9, 6), dpi=100)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    for ax, (_, ylabel, keys) in zip(axes, _CURVE_PANELS):
        drawn = False
        for key in keys:
            y = np.array([float(p.get(key, np.nan)) for p in curve])
            if not np.isfinite(y).any():
                continue
            if key == "dead_fraction":
                y = 100 * y
            label = {"loss": "loss", "total_loss": "loss + AuxK"}.get(key, key)
            ax.plot(steps, y, marker="." if len(steps) < 30 else None, label=label)
            drawn = True
        if keys[0] == "dead_fraction" and final_dead is not None:
            ax.axhline(100 * final_dead, color="tab:red", linestyle="--", linewidth=1,
                       label=f"stored with the model: {100 * final_dead:.1f}%")
            ax.legend(fontsize=7)
        if keys[0] == "dead_fraction" and dead_tokens:
            ylabel = f"dead latents (%; no fire in last {_fmt_tokens(dead_tokens)} tokens)"
        ax.set_ylabel(ylabel, fontsize=8)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="0.5")
        elif len(keys) > 1:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[2:]:
        ax.set_xlabel("optimizer step")
    fig.suptitle(f"{title + ': ' if title else ''}training curves", fontsize=10)
    fig.tight_layout()
    return fig


def write_sae_figures(store: Any, sae_id: str, out_dir: Path) -> list[Path]:
    """Write ``firing_histogram.png`` and (when a curve was logged) ``training_curves.png`` of ``sae_id`` into
    ``out_dir`` (created); returns the paths written. Raises ``UnknownSAEError`` for an unknown id."""
    from spg_dist.store import sae_models
    from spg_dist.store.filters import where

    out_dir = Path(out_dir)
    row = sae_models.get(store, sae_id, with_weights=False)
    label = short_sae_label(row)
    metrics = sae_models.metrics_of(row)
    rec = sae_models.latent_record(row) or _record_from_checkpoint(row)
    written: list[Path] = []
    if rec is not None:
        written.append(save_figure(firing_histogram_figure(rec, label), out_dir / HISTOGRAM_FILE))
    else:  # registered before the record was stored: the PNG drawn at training time
        t = store.read(sae_models.TABLE, where=where(sae_id=sae_id), columns=["firing_histogram_png"])
        png = t.column("firing_histogram_png")[0].as_py() if t.num_rows else None
        if png:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / HISTOGRAM_FILE).write_bytes(png)
            written.append(out_dir / HISTOGRAM_FILE)
    curve = metrics.get("curve") or []
    if curve:
        dead_tokens = (rec or {}).get("dead_tokens") or _config_dead_tokens(row)
        final_dead = (rec or {}).get("dead_fraction", row.get("dead_fraction"))
        written.append(save_figure(training_curves_figure(curve, label, dead_tokens, final_dead), out_dir / CURVES_FILE))
    return written


def _record_from_checkpoint(row: Mapping[str, Any]) -> dict | None:
    """For a row registered before the record was stored with it: the run's final checkpoint, if it is here."""
    import json

    try:
        cfg = json.loads(row.get("config") or "{}").get("sae")
        if not cfg or not row.get("run_dir"):
            return None
        from spg_dist.sae.checkpoint import latent_record_from_run

        return latent_record_from_run(row["run_dir"], cfg, row.get("steps"))
    except (ValueError, TypeError, AttributeError, OSError):
        return None


def _config_dead_tokens(row: Mapping[str, Any]) -> int | None:
    import json

    try:
        cfg = json.loads(row.get("config") or "{}")
        train = (cfg.get("train") or {}).get("dead_tokens")
        return int(train or (cfg.get("sae") or {}).get("dead_tokens"))
    except (TypeError, ValueError, AttributeError):
        return None


__all__ = ["CURVES_FILE", "HISTOGRAM_FILE", "firing_histogram_figure", "sae_label", "short_sae_label",
           "training_curves_figure", "write_sae_figures"]
