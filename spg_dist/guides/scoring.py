"""From patch probabilities to anomaly maps and image scores (SPG.md): bilinear upsampling to the mask
resolution, and log-sum-exp pooling ``S_τ = τ log(mean exp(p/τ))`` (τ -> 0 is max pooling)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def upsample(p: Tensor, size: int | tuple[int, int]) -> Tensor:
    """[B, h, w] -> [B, H, W], bilinear (align_corners=False, as the field does)."""
    size = (size, size) if isinstance(size, int) else size
    return torch.nn.functional.interpolate(p[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def parse_pooling(spec: str) -> tuple[str, float | None]:
    """``max`` | ``mean`` | ``lse:TAU``."""
    if spec in ("max", "mean"):
        return spec, None
    if spec.startswith("lse:"):
        tau = float(spec[4:])
        if tau <= 0:
            raise ValueError(f"pooling {spec!r}: tau must be > 0")
        return "lse", tau
    raise ValueError(f"unknown pooling {spec!r}; use max, mean or lse:TAU")


def image_scores(maps: Tensor, pooling: str = "max") -> Tensor:
    """[B, H, W] -> [B]."""
    kind, tau = parse_pooling(pooling)
    flat = maps.reshape(maps.shape[0], -1)
    if kind == "max":
        return flat.max(-1).values
    if kind == "mean":
        return flat.mean(-1)
    return tau * (torch.logsumexp(flat / tau, dim=-1) - math.log(flat.shape[-1]))
