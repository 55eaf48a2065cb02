"""LAKE, visual part (training-free, few normal samples): the "anomaly-sensitive neurons" are the feature
channels with the highest variance over the normal patches of N shots; a patch's score is its standardised
deviation from the normal statistics on those channels; the image score is max pooling.

``view="channels"`` (LAKE's): the top-``channels`` coordinates by variance; per patch the root mean square of
``(x_c - mu_c) / sigma_c`` over them. ``view="pca"``: the same on the truncated PCA of the normal patches (the
top principal directions instead of axis-aligned channels, each standardised by its eigenvalue), i.e. a
Mahalanobis distance in the leading subspace. The two agree when the channels are uncorrelated. The original
also fuses a CLIP text cue; without a text tower that part is left out (and says so in its params).

Statistics are pooled over every normal patch of the shots (not per position): with a handful of images a
per-position estimate would be noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spg_dist.detectors.base import (ArrayLike, Detector, DetectorConfigError, FitData, Inputs, TokenSet,
                                     check_tokens, to_tensor)

VIEWS = ("channels", "pca")


class LAKEDetector(Detector):
    name = "lake"
    summary = "LAKE (visual part): standardised deviation on the highest-variance channels of N normal shots"

    @dataclass(frozen=True)
    class Settings:
        shots: int = 4
        channels: int = 100  # neurons kept (capped at the token dimension)
        view: str = "channels"  # channels | pca
        layer: int = -1
        pooling: str = "max"
        eps: float = 1e-6

        def __post_init__(self) -> None:
            if self.view not in VIEWS:
                raise DetectorConfigError(f"lake: view={self.view!r}, use one of {VIEWS}")
            if self.channels < 1 or self.shots < 1:
                raise DetectorConfigError("lake: channels and shots must be >= 1")

    def __init__(self, settings: Any = None, **overrides: Any) -> None:
        super().__init__(settings, **overrides)
        self.mean: torch.Tensor | None = None
        self.basis: torch.Tensor | None = None  # [d, c]: selected channels (one-hot columns) or principal axes
        self.scale: torch.Tensor | None = None  # [c]: standard deviation along each column of the basis
        self.selected: np.ndarray | None = None  # channel indices (view "channels")

    def inputs(self) -> Inputs:
        return Inputs(layers=(self.settings.layer,), shots=self.settings.shots)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "text_cue": "none (visual part only)"}

    def fit(self, data: FitData) -> "LAKEDetector":
        t = to_tensor(data.need("shots", "lake").layer()[:self.settings.shots]).double()
        check_tokens(t, "normal tokens")
        x = t.reshape(-1, t.shape[-1])
        c = min(self.settings.channels, x.shape[1])
        self.mean = x.mean(0)
        xc = x - self.mean
        if self.settings.view == "channels":
            var = xc.pow(2).mean(0)
            order = torch.argsort(var, descending=True, stable=True)[:c]
            self.selected = order.numpy()
            self.basis = torch.zeros(x.shape[1], c, dtype=torch.float64)
            self.basis[order, torch.arange(c)] = 1.0
            self.scale = var[order].sqrt()
        else:
            # principal axes of the normal patches: eigenvectors of the covariance, largest eigenvalues first
            cov = xc.T @ xc / max(x.shape[0] - 1, 1)
            evals, evecs = torch.linalg.eigh(cov)
            order = torch.argsort(evals, descending=True)[:c]
            self.basis, self.scale = evecs[:, order], evals[order].clamp_min(0).sqrt()
            self.selected = None
        return self

    @torch.no_grad()
    def score(self, batch: TokenSet | ArrayLike) -> np.ndarray:
        if self.mean is None:
            raise RuntimeError("LAKEDetector.score called before fit")
        t = to_tensor(batch.layer() if isinstance(batch, TokenSet) else batch).double()
        check_tokens(t)
        m, h, w, d = t.shape
        z = ((t.reshape(-1, d) - self.mean) @ self.basis) / (self.scale + self.settings.eps)
        return z.pow(2).mean(1).sqrt().reshape(m, h, w).float().numpy()


__all__ = ["LAKEDetector", "VIEWS"]
