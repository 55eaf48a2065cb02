"""Initial values of SAE parameters: random unit-norm atoms and the pre-encoder bias from a data sample.

Kept apart from the model so the statistics (geometric median) are testable on their own and reusable by
Stage 2 (e.g. a robust centre of auxiliary tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor


def random_unit_rows(rows: int, cols: int, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """``[rows, cols]`` with i.i.d. Gaussian rows scaled to unit norm (uniform directions on the sphere).

    Drawn on the CPU from ``generator`` so the same seed gives the same atoms on every device and worker.
    """
    w = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    w /= w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return w.to(dtype)


def geometric_median(x: Tensor, max_iter: int = 32, tol: float = 1e-6, eps: float = 1e-8) -> Tensor:
    """Geometric median of the rows of ``x [N, d]`` by Weiszfeld's iteration (starting at the mean).

    Why the median rather than the mean for ``b_pre``: patch tokens of ViTs have a few huge-norm outlier
    tokens (registers-like artefacts); the geometric median is robust to them, so ``b_pre`` lands in the bulk of
    the data (as in Gao et al. and sparsify). A few iterations suffice for an initialisation; stops early when
    the update is below ``tol`` relative to the estimate's norm. Computed in float64 for fp16/bf16 inputs.
    """
    x = x.reshape(-1, x.shape[-1]).to(torch.float64)
    if x.shape[0] == 0:
        raise ValueError("geometric_median: empty sample")
    y = x.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        done = (y_new - y).norm() <= tol * (1.0 + y.norm())
        y = y_new
        if bool(done):
            break
    return y
