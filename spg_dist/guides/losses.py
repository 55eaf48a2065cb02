"""Stage 2 losses on upsampled anomaly maps p [B, H, W] against binary masks y [B, H, W]."""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-6


def focal(p: Tensor, y: Tensor, gamma: float = 2.0) -> Tensor:
    """Binary focal loss, mean over pixels: -(1 - p_t)^γ log p_t."""
    p = p.clamp(EPS, 1 - EPS)
    p_t = torch.where(y > 0.5, p, 1 - p)
    return (-(1 - p_t).pow(gamma) * p_t.log()).mean()


def balanced_bce(p: Tensor, y: Tensor) -> Tensor:
    """BCE with the two classes weighted equally (anomalous pixels are rare)."""
    p = p.clamp(EPS, 1 - EPS)
    pos, neg = y > 0.5, y <= 0.5
    terms = []
    if pos.any():
        terms.append(-p[pos].log().mean())
    if neg.any():
        terms.append(-(1 - p[neg]).log().mean())
    return sum(terms) / len(terms)


def dice(p: Tensor, y: Tensor) -> Tensor:
    """Soft Dice loss of the anomaly channel over the batch: 1 - 2|p∩y| / (|p| + |y|)."""
    inter = (p * y).sum()
    return 1 - (2 * inter + EPS) / (p.sum() + y.sum() + EPS)
