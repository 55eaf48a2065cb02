"""Image scores from anomaly maps or patch scores: one parser and one pooling function for every detector.

Specs: ``max``; ``mean``; ``lse:TAU`` (log-sum-exp, ``τ log mean exp(s/τ)``, τ -> 0 is max pooling; SPG Eq. 12);
``top:P%`` (mean of the top P percent, at least one value; AnomalyDINO's 1 %, VisualAD's top 1 % pixels);
``top:K`` (mean of the K largest; FoundAD's K = 10 / 6). Computed in float64: in float32 a large τ drifts by ~1e-4 and a naive small-τ form overflows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Pooling:
    kind: str  # max | mean | lse | top_fraction | top_k
    value: float | None = None

    def __str__(self) -> str:
        if self.kind == "lse":
            return f"lse:{self.value:g}"
        if self.kind == "top_fraction":
            return f"top:{100 * self.value:g}%"
        if self.kind == "top_k":
            return f"top:{int(self.value)}"
        return self.kind


def parse_pooling(spec: str | Pooling) -> Pooling:
    """``max`` | ``mean`` | ``lse:TAU`` | ``top:P%`` | ``top:K``; anything else raises ``ValueError`` naming them."""
    if isinstance(spec, Pooling):
        return spec
    s = str(spec).strip()
    if s in ("max", "mean"):
        return Pooling(s)
    try:
        if s.startswith("lse:"):
            tau = float(s[4:])
            if not (tau > 0 and math.isfinite(tau)):
                raise ValueError
            return Pooling("lse", tau)
        if s.startswith("top:") and s.endswith("%"):
            p = float(s[4:-1]) / 100
            if not 0 < p <= 1:
                raise ValueError
            return Pooling("top_fraction", p)
        if s.startswith("top:"):
            k = int(s[4:])
            if k < 1:
                raise ValueError
            return Pooling("top_k", float(k))
    except ValueError:
        raise ValueError(f"pooling {spec!r}: TAU must be > 0, P in (0, 100], K >= 1") from None
    raise ValueError(f"unknown pooling {spec!r}; use max, mean, lse:TAU, top:P% or top:K")


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def pool(scores: Any, spec: str | Pooling) -> np.ndarray:
    """``[N, ...]`` maps or patch scores (NumPy or torch) -> ``[N]`` float64 image scores."""
    p = parse_pooling(spec)
    flat = _numpy(scores)
    if flat.ndim < 2:
        raise ValueError(f"pooling needs [N, ...] scores, got shape {flat.shape}")
    flat = flat.reshape(flat.shape[0], -1)
    n = flat.shape[1]
    if p.kind == "max":
        return flat.max(axis=1)
    if p.kind == "mean":
        return flat.mean(axis=1)
    if p.kind == "lse":
        z = flat / p.value
        m = z.max(axis=1, keepdims=True)
        return p.value * (m[:, 0] + np.log(np.exp(z - m).mean(axis=1)))
    k = int(p.value) if p.kind == "top_k" else max(1, math.ceil(p.value * n - 1e-9))
    k = min(k, n)
    return -np.partition(-flat, k - 1, axis=1)[:, :k].mean(axis=1)


__all__ = ["Pooling", "parse_pooling", "pool"]
