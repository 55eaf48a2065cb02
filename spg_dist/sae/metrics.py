"""Reconstruction and sparsity metrics of an SAE, and the firing-frequency histogram stored with each model.

Metric functions return 0-d tensors (no host sync), so a trainer can stack all of a step's metrics and move
them to the host once.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from torch import Tensor


def _tv(x: Tensor) -> Tensor:
    x = x.reshape(-1, x.shape[-1]).float()
    return (x - x.mean(0)).pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)


def nmse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Normalised MSE (= fraction of variance unexplained, FVU): ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``.

    0 is perfect, 1 is what predicting the batch mean achieves."""
    r = (x.float() - x_hat.float()).reshape(-1, x.shape[-1])
    return r.pow(2).sum() / _tv(x)


def explained_variance(x: Tensor, x_hat: Tensor) -> Tensor:
    """``1 - sum ||r - mean(r)||^2 / sum ||x - mean(x)||^2`` with residual ``r = x - x_hat``.

    Unlike ``1 - nmse`` it ignores a constant offset of the reconstruction (a bias error), i.e. it measures
    how much of the token *variation* the code explains."""
    r = (x.float() - x_hat.float()).reshape(-1, x.shape[-1])
    return 1.0 - (r - r.mean(0)).pow(2).sum() / _tv(x)


def l0(values: Tensor) -> Tensor:
    """Mean number of active (positive) latents per token of a code ``values [..., m]``."""
    v = values.reshape(-1, values.shape[-1]) if values.dim() else values.reshape(1, 1)
    return (v > 0).sum(-1).float().mean()


def firing_frequency_histogram_png(counts: Tensor | np.ndarray, tokens: int, title: str | None = None,
                                   bins: int = 50) -> bytes:
    """PNG bytes of the histogram of ``log10(firing frequency)`` of the latents (``counts / tokens``).

    Dead latents (count 0) have no logarithm; they are drawn as a separate red bar left of the axis range, and
    their number and fraction are in the title, so a dead dictionary is visible at a glance. Uses the Agg canvas
    directly (no pyplot global state: safe in worker threads and headless machines).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = counts.detach().cpu().numpy() if isinstance(counts, Tensor) else np.asarray(counts)
    c = c.astype(np.float64).reshape(-1)
    n_total = c.size
    alive = c[c > 0]
    n_dead = int(n_total - alive.size)
    fig = Figure(figsize=(6, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if alive.size:
        logf = np.log10(alive / max(tokens, 1))
        lo, hi = float(logf.min()), float(logf.max())
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
        ax.hist(logf, bins=bins, range=(lo, hi), color="tab:blue", label=f"alive ({alive.size})")
        width = (hi - lo) / bins
        dead_x = lo - 3 * width
    else:
        lo, hi, width, dead_x = -1.0, 0.0, 0.1, -1.0
    if n_dead:
        ax.bar([dead_x], [n_dead], width=max(2 * width, 1e-3), color="tab:red", label=f"dead ({n_dead})")
    ax.set_xlabel("log10 firing frequency (fires per token)")
    ax.set_ylabel("latents")
    frac = n_dead / n_total if n_total else math.nan
    ax.set_title(f"{title + ': ' if title else ''}{n_total} latents, {tokens} tokens, "
                 f"dead {n_dead} ({100 * frac:.1f}%)", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
