"""Token preprocessing that travels with the model.

Whatever is done to tokens before the SAE is recorded in the SAE's config and applied by ONE function,
:meth:`Preprocessing.apply`, everywhere tokens are read for that SAE (training, encoding, guides, evaluation).
No stage re-implements it, so a model and its tokens can never drift apart; guides and evaluation inherit it
from the SAE they are built on.

Steps, always in this order, each off by default (a dict written before a step existed lacks its key and loads
as "step off", which is what it meant):

1. ``center``: subtract each image's coordinate-wise median token. Removes what a whole image shares
   (illumination, the category's base texture), so what stays is how a patch differs from the rest of its own
   image. Needs to know which tokens form an image: input ``[B, *patch_axes, d]``.
2. ``mean``/``std``: per-dimension standardisation with statistics of the SAE's training tokens (never the
   target's). Puts dimensions of very different ranges (a filter bank's energies vs. its colour means) on one
   footing, so the cosine is not ruled by a few large ones.
3. ``scale``: one global factor; fitted so that ``E ||x||^2 = d`` (coordinates O(1) whatever the backbone, so one
   learning rate transfers).
4. ``constant``: append one component with this value (fitted as the median token norm after steps 1-3). With
   two guides SPG ranks patches by the token's *direction* alone; the appended component makes the cosine
   depend on the norm too (a token far from the normal centre points away from the constant axis), and a guide's
   weight on it acts as the bias the scoring rule lacks. The SAE's input dimension becomes ``d + 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from spg_dist.sae.config import SCALE_MODES, SAEConfigError

STEPS = ("center", "standardize", "scale", "constant")
"""Names of the fittable steps, in the order they run (``spg train-sae --preprocess``)."""

_STD_FLOOR = 1e-6  # relative to the largest std: a dimension constant in the sample is left unscaled, not blown up


def parse_steps(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"center,standardize"`` / an iterable / ``"none"`` / None -> the steps in canonical order; unknown raise."""
    if spec is None:
        return ()
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s and s.strip()]
    items = [s for s in items if s != "none"]
    unknown = sorted(set(items) - set(STEPS))
    if unknown:
        raise SAEConfigError(f"unknown preprocessing step(s) {unknown}; known: {', '.join(STEPS)} (or none)")
    return tuple(s for s in STEPS if s in items)


def _floats(v: Any) -> tuple[float, ...] | None:
    return None if v is None else tuple(float(x) for x in v)


@dataclass(frozen=True)
class Preprocessing:
    """Token preprocessing of one SAE (see the module docstring for the steps and why each exists).

    Frozen and hashable: the SAEs of one training pass share one instance, and MultiSAE applies it once per batch.
    """

    scale: float = 1.0
    center: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    constant: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise SAEConfigError(f"Preprocessing: scale={self.scale!r} must be a finite number > 0")
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "center", bool(self.center))
        object.__setattr__(self, "mean", _floats(self.mean))
        object.__setattr__(self, "std", _floats(self.std))
        if (self.mean is None) != (self.std is None):
            raise SAEConfigError("Preprocessing: standardisation needs both mean and std")
        if self.mean is not None:
            if len(self.mean) != len(self.std) or not self.mean:
                raise SAEConfigError(f"Preprocessing: mean has {len(self.mean)} entries, std {len(self.std)}")
            if not all(math.isfinite(m) for m in self.mean) or not all(math.isfinite(s) and s > 0 for s in self.std):
                raise SAEConfigError("Preprocessing: mean must be finite and std finite and > 0")
        if not (math.isfinite(self.constant) and self.constant >= 0):
            raise SAEConfigError(f"Preprocessing: constant={self.constant!r} must be finite and >= 0 (0 = off)")
        object.__setattr__(self, "constant", float(self.constant))

    # ------------------------------------------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, sample: Tensor, mode: str = "unit_mean_sq_norm", steps: str | Iterable[str] | None = None
            ) -> "Preprocessing":
        """Fit on raw tokens of the SAE's training data.

        ``steps`` (see :data:`STEPS`) chooses what to fit; when None, ``mode`` alone decides (the input scale:
        ``"unit_mean_sq_norm"`` -> ``steps=("scale",)``, ``"none"`` -> identity). ``sample`` is ``[N, d]``, or
        ``[B, *patch_axes, d]`` (whole images), which ``center`` requires. Statistics in float64 (fp16 tokens
        from the store would overflow when squared).
        """
        if steps is None:
            if mode not in SCALE_MODES:
                raise SAEConfigError(f"Preprocessing.fit: unknown mode {mode!r} (known: {', '.join(SCALE_MODES)})")
            steps = () if mode == "none" else ("scale",)
        chosen = parse_steps(steps)
        if sample.numel() == 0:
            raise ValueError("Preprocessing.fit: empty sample")
        if "center" in chosen and sample.dim() < 3:
            raise ValueError("Preprocessing.fit: per-image centring needs whole images, [B, *patch_axes, d]; "
                             f"got {tuple(sample.shape)}")
        x = sample.to(torch.float64)
        if "center" in chosen:
            x = _center_images(x)
        x = x.reshape(-1, x.shape[-1])
        kw: dict[str, Any] = {"center": "center" in chosen}
        if "standardize" in chosen:
            mean, std = x.mean(0), x.std(0)
            std = torch.where(std > _STD_FLOOR * float(std.max().clamp_min(1e-300)), std, torch.ones_like(std))
            x = (x - mean) / std
            kw.update(mean=mean.tolist(), std=std.tolist())
        if "scale" in chosen:
            mean_sq = float(x.pow(2).sum(-1).mean())
            if not math.isfinite(mean_sq) or mean_sq <= 0:
                raise ValueError(f"Preprocessing.fit: mean squared norm of the sample is {mean_sq} "
                                 "(all-zero or non-finite tokens?)")
            kw["scale"] = math.sqrt(x.shape[-1] / mean_sq)
            x = x * kw["scale"]
        if "constant" in chosen:
            kw["constant"] = max(float(x.norm(dim=-1).median()), 1e-6)
        return cls(**kw)

    # ------------------------------------------------------------------------------------------------ applying
    @property
    def is_identity(self) -> bool:
        """True when :meth:`apply` only casts to float32."""
        return self.scale == 1.0 and not self.center and self.mean is None and self.constant == 0.0

    @property
    def needs_images(self) -> bool:
        """True when :meth:`apply` must see whole images (``[B, *patch_axes, d]``), not loose tokens."""
        return self.center

    @property
    def extra_dims(self) -> int:
        """How many components :meth:`apply` appends (SAE input dim = raw dim + this)."""
        return int(self.constant > 0)

    def out_dim(self, raw_dim: int) -> int:
        return raw_dim + self.extra_dims

    def check_raw_dim(self, raw_dim: int) -> None:
        if self.mean is not None and len(self.mean) != raw_dim:
            raise ValueError(f"token dimension {raw_dim} does not match the preprocessing's statistics "
                             f"(fitted on d={len(self.mean)})")

    def apply(self, x: Tensor) -> Tensor:
        """Raw tokens -> preprocessed float32 tokens, steps in the fixed order of the module docstring.

        ``x``: ``[..., d]``; with ``center`` it must be ``[B, *patch_axes, d]`` (each ``x[b]`` one whole image),
        else a ValueError, since loose tokens cannot be centred on their image. Output: same leading shape,
        last dim ``d + extra_dims``. float32 because the SAE's parameters are (bf16 autocast, where used, happens
        inside the model); float64 input stays float64 (exact reference computations in tests).
        """
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        self.check_raw_dim(x.shape[-1])
        if self.center:
            if x.dim() < 3:
                raise ValueError("this SAE's preprocessing centres each image on its median token, so it needs "
                                 f"whole images [B, *patch_axes, d]; got loose tokens {tuple(x.shape)}")
            x = _center_images(x)
        if self.mean is not None:
            x = (x - x.new_tensor(self.mean)) / x.new_tensor(self.std)
        if self.scale != 1.0:
            x = x * self.scale
        if self.constant:
            x = torch.cat([x, x.new_full((*x.shape[:-1], 1), self.constant)], dim=-1)
        return x

    def invert(self, x: Tensor) -> Tensor:
        """SAE-space vectors (reconstructions, guides) -> raw token space, as far as the steps allow: the appended
        component is dropped and scale/standardisation undone; per-image centring cannot be undone (the image's
        median is not known), so the result is relative to the image's median token when ``center`` is on."""
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        if self.constant:
            x = x[..., :-1]
        if self.scale != 1.0:
            x = x / self.scale
        if self.mean is not None:
            x = x * x.new_tensor(self.std) + x.new_tensor(self.mean)
        return x

    # ------------------------------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; ``from_dict(to_dict())`` equals the original."""
        return {"scale": self.scale, "center": self.center, "mean": None if self.mean is None else list(self.mean),
                "std": None if self.std is None else list(self.std), "constant": self.constant}

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

    def describe(self) -> str:
        """One line for logs: the active steps."""
        parts = (["center(image median)"] if self.center else []) + \
                ([f"standardize(d={len(self.mean)})"] if self.mean is not None else []) + \
                ([f"scale({self.scale:.4g})"] if self.scale != 1.0 else []) + \
                ([f"constant({self.constant:.4g})"] if self.constant else [])
        return " -> ".join(parts) or "identity"

    def __repr__(self) -> str:  # the statistics would print d floats
        return f"Preprocessing({self.describe()})"


def _center_images(x: Tensor) -> Tensor:
    """``[B, *patch_axes, d]`` minus each image's coordinate-wise median over its patches."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    med = flat.median(dim=1, keepdim=True).values
    return (flat - med).reshape(x.shape)
