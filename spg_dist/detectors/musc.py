"""Zero-shot, label-free MuSc-style scoring (Li et al. 2024, simplified): each patch of each test image against
the patches of the *other* test images of its category; for every other image the minimum cosine distance, and
the patch score is the mean of the smallest ``fraction`` of these per-image minima. Normal patches find close
matches in most images; anomalies, rare across images, stay far from most of them.

Transductive: it reads the unlabelled test set of the target category (labels hidden), nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spg_dist.detectors.base import (ArrayLike, Detector, DetectorConfigError, FitData, Inputs, TokenSet,
                                     check_tokens, l2_normalize, to_tensor)


class MuScDetector(Detector):
    name = "musc"
    summary = "label-free MuSc-style mutual scoring against the other unlabelled test images of the category"

    @dataclass(frozen=True)
    class Settings:
        fraction: float = 0.3  # share of the other images (smallest per-image minima) averaged
        layer: int = -1
        pooling: str = "top:1%"
        chunk: int = 16384

        def __post_init__(self) -> None:
            if not 0.0 < self.fraction <= 1.0:
                raise DetectorConfigError(f"musc: fraction={self.fraction} must be in (0, 1]")

    def __init__(self, settings: Any = None, device: str = "cpu", **overrides: Any) -> None:
        super().__init__(settings, **overrides)
        self.device = device
        self.pool_tokens: torch.Tensor | None = None
        self.pool_ids: list[str] = []

    def inputs(self) -> Inputs:
        return Inputs(layers=(self.settings.layer,), unlabelled_target=True)

    def n_used(self, m: int) -> int:
        """Per-image minima averaged when ``m`` images are scored against each other."""
        return min(m - 1, max(1, int(math.ceil(self.settings.fraction * (m - 1) - 1e-9))))

    def fit(self, data: FitData) -> "MuScDetector":
        pool = data.need("unlabelled", "musc")
        t = to_tensor(pool.layer(), self.device)
        check_tokens(t)
        self.pool_tokens = l2_normalize(t.reshape(t.shape[0], -1, t.shape[-1]))
        self.pool_ids = list(pool.image_ids)
        return self

    @torch.no_grad()
    def score(self, batch: TokenSet | ArrayLike) -> np.ndarray:
        """Each image of ``batch`` against every image of the fitted pool but itself (matched by image id; a raw
        array is taken to be the pool itself)."""
        if isinstance(batch, TokenSet):
            t, ids = to_tensor(batch.layer(), self.device), list(batch.image_ids)
        else:
            t = to_tensor(batch, self.device)
            if self.pool_tokens is None:  # a bare array: score the images against each other
                self.pool_tokens = l2_normalize(t.reshape(t.shape[0], -1, t.shape[-1]))
                self.pool_ids = [str(i) for i in range(t.shape[0])]
            ids = self.pool_ids[:t.shape[0]] if t.shape[0] == len(self.pool_ids) else [None] * t.shape[0]
        check_tokens(t)
        if self.pool_tokens is None:
            raise RuntimeError("MuScDetector.score called before fit")
        m, h, w, d = t.shape
        pool = self.pool_tokens
        if pool.shape[0] < 2:
            raise DetectorConfigError("musc needs at least 2 test images in a category")
        q = l2_normalize(t.reshape(m * h * w, d))
        owner = torch.arange(m, device=q.device).repeat_interleave(h * w)
        mins = torch.empty(m * h * w, pool.shape[0], dtype=torch.float32, device=q.device)
        c = self.settings.chunk
        for j in range(pool.shape[0]):
            for s in range(0, q.shape[0], c):
                mins[s:s + c, j] = 1.0 - (q[s:s + c] @ pool[j].T).max(dim=1).values
        index = {i: k for k, i in enumerate(self.pool_ids)}
        self_col = torch.tensor([index.get(i, -1) for i in ids], device=q.device)
        own = self_col[owner]
        has = own >= 0
        mins[torch.nonzero(has).flatten(), own[has]] = float("inf")  # never against itself
        others = pool.shape[0] - int(bool(has.any()))
        k = self.n_used(others + 1)
        smallest = torch.topk(mins, k, dim=1, largest=False).values
        return smallest.mean(dim=1).reshape(m, h, w).cpu().numpy().astype(np.float32)


__all__ = ["MuScDetector"]
