"""From patch probabilities to anomaly maps and image scores: bilinear upsampling to the mask
resolution, and log-sum-exp pooling ``S_τ = τ log(mean exp(p/τ))`` (τ -> 0 is max pooling)."""

from __future__ import annotations

import torch
from torch import Tensor

from spg_dist.evaluation.pooling import parse_pooling, pool  # noqa: F401  (parse_pooling re-exported)


def upsample(p: Tensor, size: int | tuple[int, int]) -> Tensor:
    """[B, h, w] -> [B, H, W], bilinear (align_corners=False, as the field does)."""
    size = (size, size) if isinstance(size, int) else size
    return torch.nn.functional.interpolate(p[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def image_scores(maps: Tensor, pooling: str = "max") -> Tensor:
    """[B, H, W] -> [B] float64 (see :func:`spg_dist.evaluation.pooling.pool`: max | mean | lse:TAU | top:...)."""
    return torch.from_numpy(pool(maps, pooling))
