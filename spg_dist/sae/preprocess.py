"""Token preprocessing that travels with the model (DESIGN.md, "Token preprocessing travels with the model").

Whatever is done to tokens before the SAE is recorded in the SAE's config and applied by ONE function,
:meth:`Preprocessing.apply`, everywhere tokens are read for that SAE (training, encoding, guides, evaluation,
atom queries). No stage re-implements it, so a model and its tokens can never drift apart.

Today the only step is a global input scale. The dataclass is built to grow: every future step (per-image
centring, per-dimension standardisation with auxiliary statistics, an appended constant component) is a new
field whose default is the identity, and :meth:`Preprocessing.apply` runs the steps in a fixed order. Dicts
written before a field existed lack its key and therefore load as "step off", which is what they meant.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
from torch import Tensor

from spg_dist.sae.config import SCALE_MODES, SAEConfigError


@dataclass(frozen=True)
class Preprocessing:
    """Token preprocessing of one SAE.

    ``scale``: tokens are multiplied by it. :meth:`fit` with mode ``"unit_mean_sq_norm"`` chooses it so that the
    scaled tokens have unit mean square *per dimension*, i.e. ``E ||scale * x||^2 = d``. We pick ``d`` rather
    than 1 so that coordinates, biases and pre-activations stay O(1) whatever the backbone width, and one Adam
    learning rate (1e-3, the paper's) transfers across backbones (d = 768 ... 1024) and layers whose token norms
    differ by orders of magnitude.

    Frozen (hashable, shareable between the SAEs of one training pass without copies).
    """

    scale: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise SAEConfigError(f"Preprocessing: scale={self.scale!r} must be a finite number > 0")
        object.__setattr__(self, "scale", float(self.scale))

    @classmethod
    def fit(cls, sample: Tensor, mode: str = "unit_mean_sq_norm") -> "Preprocessing":
        """Fit the preprocessing on a sample of raw tokens ``[N, d]`` (or ``[..., d]``).

        ``"unit_mean_sq_norm"``: ``scale = sqrt(d / mean ||x||^2)`` (see the class docstring).
        ``"none"``: identity (scale 1.0). The statistics are computed in float64, so fp16 tokens from the store
        do not overflow when squared.
        """
        if mode not in SCALE_MODES:
            raise SAEConfigError(f"Preprocessing.fit: unknown mode {mode!r} (known: {', '.join(SCALE_MODES)})")
        if mode == "none":
            return cls()
        x = sample.reshape(-1, sample.shape[-1]).to(torch.float64)
        if x.shape[0] == 0:
            raise ValueError("Preprocessing.fit: empty sample")
        mean_sq = float(x.pow(2).sum(-1).mean())
        if not math.isfinite(mean_sq) or mean_sq <= 0:
            raise ValueError(f"Preprocessing.fit: mean squared norm of the sample is {mean_sq} (all-zero or non-finite tokens?)")
        return cls(scale=math.sqrt(x.shape[-1] / mean_sq))

    @property
    def is_identity(self) -> bool:
        """True when :meth:`apply` only casts to float32 (lets callers skip nothing but know it)."""
        return self.scale == 1.0

    def apply(self, x: Tensor) -> Tensor:
        """Raw tokens ``[..., d]`` (any float dtype) -> preprocessed float32 tokens ``[..., d]``.

        The single entry point of tokens into an SAE. Steps run in a fixed order (today: scale). The result is
        float32 because the SAE's parameters and loss are float32 (bf16 autocast, where used, is applied inside
        the model, not to stored inputs); float64 input stays float64 (exact reference computations in tests).
        """
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        if self.scale != 1.0:
            x = x * self.scale
        return x

    def invert(self, x: Tensor) -> Tensor:
        """Map SAE-space vectors (e.g. reconstructions, guides) back to raw token space, where a step allows it."""
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        if self.scale != 1.0:
            x = x / self.scale
        return x

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; ``from_dict(to_dict())`` equals the original."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "Preprocessing":
        """Inverse of :meth:`to_dict`. Missing keys = defaults (steps off); ``None`` = identity; unknown keys
        raise, because silently skipping a step this code does not know would feed the model wrong tokens."""
        if data is None:
            return cls()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SAEConfigError(f"Preprocessing: unknown steps {unknown} (known: {sorted(known)}); "
                                 "this model was written by newer code")
        return cls(**dict(data))
