"""Common detector interface.

A detector consumes patch tokens of shape ``[N, h, w, d]`` (NumPy array or torch
Tensor) and produces patch anomaly scores of shape ``[M, h, w]`` (higher = more
anomalous). ``image_score`` aggregates patch scores into one score per image
(mean of the top ``top_fraction`` patch scores, at least one patch, as in
AnomalyDINO).
"""

from __future__ import annotations

import abc
import math
from typing import Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


def to_tensor(x: ArrayLike, device: str | torch.device = "cpu") -> torch.Tensor:
    """Convert to a float32 torch tensor on ``device``."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        t = torch.as_tensor(np.asarray(x))
    return t.to(device=device, dtype=torch.float32)


def check_tokens(t: torch.Tensor, name: str = "tokens") -> None:
    if t.ndim != 4:
        raise ValueError(f"{name} must have shape [N, h, w, d], got {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty")


def l2_normalize(t: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise along the last dimension."""
    return t / t.norm(dim=-1, keepdim=True).clamp_min(eps)


def image_score(patch_scores: ArrayLike, top_fraction: float = 0.01) -> np.ndarray:
    """Image anomaly score = mean of the top ``top_fraction`` patch scores.

    ``patch_scores`` is ``[M, h, w]`` (or ``[M, L]``); at least one patch is used.
    Returns ``[M]`` float array.
    """
    s = patch_scores.detach().cpu().numpy() if isinstance(patch_scores, torch.Tensor) else np.asarray(patch_scores)
    if s.ndim < 2:
        raise ValueError(f"patch_scores must be [M, h, w], got shape {s.shape}")
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError("top_fraction must be in (0, 1]")
    flat = s.reshape(s.shape[0], -1)
    n = flat.shape[1]
    k = max(1, int(math.ceil(top_fraction * n - 1e-9)))
    k = min(k, n)
    top = -np.partition(-flat, k - 1, axis=1)[:, :k]
    return top.mean(axis=1)


class Detector(abc.ABC):
    """Patch anomaly detector on stored tokens."""

    @abc.abstractmethod
    def fit(self, normal_tokens: ArrayLike) -> "Detector":
        """Fit on normal tokens ``[N, h, w, d]``; returns ``self``."""

    @abc.abstractmethod
    def score(self, tokens: ArrayLike) -> np.ndarray:
        """Patch anomaly scores ``[M, h, w]`` (float32, higher = more anomalous)."""

    def image_score(self, patch_scores: ArrayLike, top_fraction: float = 0.01) -> np.ndarray:
        return image_score(patch_scores, top_fraction)

    def score_images(self, tokens: ArrayLike, top_fraction: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
        """Convenience: returns ``(patch_scores [M,h,w], image_scores [M])``."""
        ps = self.score(tokens)
        return ps, image_score(ps, top_fraction)
