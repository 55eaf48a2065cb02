"""Zero-shot, label-free MuSc-style detector (Li et al. 2024, simplified).

Each patch of each image is scored against the patches of all *other* images of
the same batch (pass the test images of one category together): for patch p of
image i and every other image j, take the minimum cosine distance from p to the
patches of j; the patch score is the mean of the smallest ``fraction`` of these
per-image minima. Normal patches find close matches in most images; anomalies,
rare across images, stay far from most of them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from spg_dist.detectors.base import ArrayLike, Detector, check_tokens, l2_normalize, to_tensor


class MuScDetector(Detector):
    """Mutual-scoring zero-shot detector.

    Args:
        fraction: fraction of the other images (smallest per-image minima) to
            average; at least one image is used.
        device: torch device.
        chunk: number of query patches per matmul chunk (each chunk materialises a
            ``chunk x (h*w)`` similarity matrix per other image).
    """

    def __init__(self, fraction: float = 0.3, device: str = "cpu", chunk: int = 16384):
        if not 0.0 < fraction <= 1.0:
            raise ValueError("fraction must be in (0, 1]")
        if chunk < 1:
            raise ValueError("chunk must be >= 1")
        self.fraction = float(fraction)
        self.device = device
        self.chunk = int(chunk)

    def fit(self, normal_tokens: ArrayLike | None = None) -> "MuScDetector":
        """No-op (zero-shot)."""
        return self

    def n_used(self, m: int) -> int:
        """Number of per-image minima averaged for a batch of ``m`` images."""
        return min(m - 1, max(1, int(math.ceil(self.fraction * (m - 1) - 1e-9))))

    @torch.no_grad()
    def score(self, tokens: ArrayLike) -> np.ndarray:
        t = to_tensor(tokens, self.device)
        check_tokens(t)
        m, h, w, d = t.shape
        if m < 2:
            raise ValueError("MuScDetector needs at least 2 images in the batch")
        L = h * w
        x = l2_normalize(t.reshape(m, L, d))
        q = x.reshape(m * L, d)
        owner = torch.arange(m, device=q.device).repeat_interleave(L)
        # mins[r, j] = min cosine distance from query patch r to the patches of image j
        mins = torch.empty(m * L, m, dtype=torch.float32, device=q.device)
        for j in range(m):
            xj = x[j]
            for s in range(0, m * L, self.chunk):
                sim = q[s : s + self.chunk] @ xj.T
                mins[s : s + self.chunk, j] = 1.0 - sim.max(dim=1).values
        mins[torch.arange(m * L, device=q.device), owner] = float("inf")  # exclude own image
        k = self.n_used(m)
        smallest = torch.topk(mins, k, dim=1, largest=False).values
        return smallest.mean(dim=1).reshape(m, h, w).cpu().numpy().astype(np.float32)
