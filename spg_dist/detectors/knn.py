"""AnomalyDINO-style few-shot kNN detector.

Memory bank = all (L2-normalised) patch tokens of the given normal images;
patch score = cosine distance ``1 - cos`` to the nearest neighbour in the bank.
"""

from __future__ import annotations

import numpy as np
import torch

from spg_dist.detectors.base import ArrayLike, Detector, check_tokens, l2_normalize, to_tensor


def nn_cosine_distance(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Min cosine distance of each (normalised) query row to the (normalised) bank rows.

    Processes at most ``chunk`` queries at a time, so no similarity matrix larger
    than ``chunk x len(bank)`` is materialised. Returns ``[len(queries)]``.
    """
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    out = torch.empty(queries.shape[0], dtype=torch.float32, device=queries.device)
    for s in range(0, queries.shape[0], chunk):
        sim = queries[s : s + chunk] @ bank.T
        out[s : s + chunk] = 1.0 - sim.max(dim=1).values
    return out


class KNNDetector(Detector):
    """Few-shot nearest-neighbour patch detector (AnomalyDINO).

    Args:
        k_shot_images: use only the first ``k_shot_images`` normal images passed
            to :meth:`fit` (``None`` = all).
        device: torch device for the computation.
        chunk: number of query patches per matmul chunk.
    """

    def __init__(self, k_shot_images: int | None = None, device: str = "cpu", chunk: int = 4096):
        if k_shot_images is not None and k_shot_images < 1:
            raise ValueError("k_shot_images must be >= 1 or None")
        self.k_shot_images = k_shot_images
        self.device = device
        self.chunk = int(chunk)
        self.bank: torch.Tensor | None = None

    def fit(self, normal_tokens: ArrayLike) -> "KNNDetector":
        t = to_tensor(normal_tokens, self.device)
        check_tokens(t, "normal_tokens")
        if self.k_shot_images is not None:
            t = t[: self.k_shot_images]
        self.bank = l2_normalize(t.reshape(-1, t.shape[-1]))
        return self

    @torch.no_grad()
    def score(self, tokens: ArrayLike) -> np.ndarray:
        if self.bank is None:
            raise RuntimeError("KNNDetector.score called before fit")
        t = to_tensor(tokens, self.device)
        check_tokens(t)
        m, h, w, d = t.shape
        if d != self.bank.shape[1]:
            raise ValueError(f"token dim {d} != bank dim {self.bank.shape[1]}")
        q = l2_normalize(t.reshape(-1, d))
        dist = nn_cosine_distance(q, self.bank, self.chunk)
        return dist.reshape(m, h, w).cpu().numpy().astype(np.float32)
