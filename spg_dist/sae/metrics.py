"""Reconstruction and sparsity metrics of an SAE, and the firing-frequency histogram stored with each model.

Metric functions return 0-d tensors (no host sync), so a trainer can stack all of a step's metrics and move
them to the host once.
"""

from __future__ import annotations

import io

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


def firing_histogram_counts(counts: Tensor | np.ndarray, tokens: int, dead: Tensor | np.ndarray | None = None,
                            bins: int = 50) -> dict:
    """The firing-frequency histogram as JSON-able counts (what :meth:`DeadLatentTracker.record` stores).

    ``counts`` per latent over ``tokens`` observed tokens; ``dead`` (bool per latent, the one definition of
    :mod:`spg_dist.sae.tracker`) splits each bin into alive / dead latents; without it no latent is called
    dead (``"dead_known": False``). Latents that never fired have no logarithm and are counted apart.
    """
    c = (counts.detach().cpu().numpy() if isinstance(counts, Tensor) else np.asarray(counts)).astype(np.int64).reshape(-1)
    known = dead is not None
    d = (np.zeros(c.size, bool) if dead is None else
         np.asarray(dead.detach().cpu().numpy() if isinstance(dead, Tensor) else dead, bool).reshape(-1))
    if d.size != c.size:
        raise ValueError(f"dead mask has {d.size} latents, counts {c.size}")
    fired = c > 0
    freq = c / max(int(tokens), 1)
    if fired.any():
        logf = np.log10(freq[fired])
        lo, hi = float(logf.min()), float(logf.max())
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
    else:
        lo, hi = -1.0, 0.0
    edges = np.linspace(lo, hi, int(bins) + 1)
    logall = np.log10(np.where(fired, freq, 1.0))
    return {
        "C": int(c.size),
        "tokens_observed": int(tokens),
        "dead_known": known,
        "n_dead": int(d.sum()),
        "n_never_fired": int((~fired).sum()),
        "n_never_fired_dead": int((~fired & d).sum()),
        "log10_freq_edges": [float(e) for e in edges],
        "alive_counts": [int(x) for x in np.histogram(logall[fired & ~d], bins=edges)[0]],
        "dead_counts": [int(x) for x in np.histogram(logall[fired & d], bins=edges)[0]],
    }


def firing_frequency_histogram_png(counts: Tensor | np.ndarray, tokens: int, title: str | None = None,
                                   bins: int = 50, dead: Tensor | np.ndarray | None = None,
                                   dead_tokens: int | None = None) -> bytes:
    """PNG bytes of the histogram of the latents' firing frequency (``counts / tokens``, log-scale x).

    ``dead`` (bool per latent, e.g. ``tracker.dead_mask()``) marks the dead latents by the one definition (not
    fired in the last ``dead_tokens`` training tokens) in red; without it nothing is called dead, and latents
    that never fired are counted as such. Drawn by :func:`spg_dist.viz.sae_figures.draw_firing_histogram` on an
    Agg canvas (no pyplot global state: safe in worker threads and headless machines).
    """
    from spg_dist.viz.sae_figures import firing_histogram_figure

    hist = firing_histogram_counts(counts, tokens, dead, bins)
    if dead_tokens is not None:
        hist["dead_tokens"] = int(dead_tokens)
    fig = firing_histogram_figure(hist, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
