"""Configs of one SAE (:class:`SAEConfig`) and of a training run (:class:`TrainConfig`).

Both are plain dataclasses that round-trip exactly through JSON (``to_dict`` / ``from_dict``) because they are
stored with every model (``sae_models.config``) and every checkpoint; a model must always be rebuildable from
its row alone. Missing keys take their defaults (old rows stay readable when fields are added); unknown keys
are an error (a newer config whose meaning this code does not know is never half-applied).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from spg_dist.errors import SpgError

SPARSIFIERS = ("topk", "batchtopk")
B_PRE_INITS = ("geometric_median", "mean", "zeros")
SCALE_MODES = ("unit_mean_sq_norm", "none")


class SAEConfigError(SpgError, ValueError):
    """A config that cannot describe a valid SAE, or state that belongs to a different config.

    One readable line naming the offending field(s), so a sweep log says what to fix.
    """


def _from_mapping(cls: type, data: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Keyword arguments of ``cls`` from ``data``; unknown keys raise (see the module docstring)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SAEConfigError(f"{what}: unknown keys {unknown} (known: {sorted(known)})")
    return dict(data)


@dataclass(frozen=True)
class SAEConfig:
    """Shape and training-loss options of one TopK SAE.

    ``d`` token dimension, ``C`` dictionary size (latents), ``k`` active latents per token (per token for
    "topk"; on average per token, chosen across the batch, for "batchtopk"). ``auxk`` enables the AuxK loss of
    Gao et al. (2024) that revives dead latents; ``k_aux`` defaults to ``d // 2`` clamped to ``C`` (see
    :attr:`k_aux_effective`), kept as ``None`` in the dict so the round-trip is exact. ``dead_tokens``: a latent
    that did not fire in this many training tokens counts as dead. ``init_b_pre``: how the pre-encoder bias is
    initialised from a data sample.

    Frozen: one config object may be shared by a model, its tracker and its checkpoint without copies.
    Validated on construction, so an invalid config never exists.
    """

    d: int
    C: int
    k: int
    sparsifier: str = "topk"
    auxk: bool = True
    k_aux: int | None = None
    aux_coef: float = 1 / 32
    aux_fit_scale: bool = True
    dead_tokens: int = 10_000_000
    init_b_pre: str = "geometric_median"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`SAEConfigError` (one line) for a config that cannot describe a working SAE."""
        for name in ("d", "C", "k", "dead_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SAEConfigError(f"SAEConfig: {name}={value!r} must be an int")
        if self.d <= 0:
            raise SAEConfigError(f"SAEConfig: d={self.d} must be > 0")
        if self.C <= 0:
            raise SAEConfigError(f"SAEConfig: C={self.C} must be > 0")
        if self.k <= 0:
            raise SAEConfigError(f"SAEConfig: k={self.k} must be > 0")
        if self.k >= self.C:
            raise SAEConfigError(f"SAEConfig: k={self.k} must be < C={self.C} (k >= C is not sparse)")
        if self.sparsifier not in SPARSIFIERS:
            raise SAEConfigError(f"SAEConfig: unknown sparsifier {self.sparsifier!r} (known: {', '.join(SPARSIFIERS)})")
        if self.init_b_pre not in B_PRE_INITS:
            raise SAEConfigError(f"SAEConfig: unknown init_b_pre {self.init_b_pre!r} (known: {', '.join(B_PRE_INITS)})")
        if self.k_aux is not None and (isinstance(self.k_aux, bool) or not isinstance(self.k_aux, int) or self.k_aux <= 0):
            raise SAEConfigError(f"SAEConfig: k_aux={self.k_aux!r} must be a positive int or None")
        if not isinstance(self.aux_coef, (int, float)) or not math.isfinite(self.aux_coef) or self.aux_coef < 0:
            raise SAEConfigError(f"SAEConfig: aux_coef={self.aux_coef!r} must be a finite number >= 0")
        if self.dead_tokens <= 0:
            raise SAEConfigError(f"SAEConfig: dead_tokens={self.dead_tokens} must be > 0")

    @property
    def k_aux_effective(self) -> int:
        """AuxK width actually used: ``k_aux`` or ``d // 2`` (at least 1), never more than ``C``."""
        k_aux = self.k_aux if self.k_aux is not None else max(self.d // 2, 1)
        return min(k_aux, self.C)

    @property
    def name(self) -> str:
        """Short, path-safe name, e.g. ``"topk-C8192-k32"`` (used in sae_id and log lines)."""
        return f"{self.sparsifier}-C{self.C}-k{self.k}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; ``from_dict(to_dict())`` equals the original."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SAEConfig":
        """Inverse of :meth:`to_dict`; missing keys take defaults, unknown keys raise SAEConfigError."""
        return cls(**_from_mapping(cls, data, "SAEConfig"))


@dataclass(frozen=True)
class TrainConfig:
    """Settings shared by all SAEs trained together on one token stream.

    Adam ``lr``/``betas``/``eps`` (each SAE gets its own optimizer with these), ``batch_tokens`` (tokens per
    step per worker; informative for the data layer, the trainer takes whatever batch it is given),
    ``dead_tokens`` (overrides every SAE's own threshold when set), ``log_every`` (steps per metrics window),
    ``seed`` (decoder init and the trainer's generator), ``autocast_bf16`` (bf16 autocast of the forward on
    CUDA only; CPU always runs fp32), ``scale_mode`` (how the input scale is fitted by
    ``init_from_sample`` when the trainer was given no explicit Preprocessing).
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    batch_tokens: int = 4096
    dead_tokens: int | None = None
    log_every: int = 100
    seed: int = 0
    autocast_bf16: bool = True
    scale_mode: str = "unit_mean_sq_norm"

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`SAEConfigError` (one line) for unusable training settings."""
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise SAEConfigError(f"TrainConfig: lr={self.lr!r} must be a finite number > 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise SAEConfigError(f"TrainConfig: betas={self.betas!r} must be two numbers in [0, 1)")
        if not self.eps > 0:
            raise SAEConfigError(f"TrainConfig: eps={self.eps!r} must be > 0")
        if self.batch_tokens <= 0:
            raise SAEConfigError(f"TrainConfig: batch_tokens={self.batch_tokens} must be > 0")
        if self.dead_tokens is not None and self.dead_tokens <= 0:
            raise SAEConfigError(f"TrainConfig: dead_tokens={self.dead_tokens} must be > 0 or None")
        if self.log_every <= 0:
            raise SAEConfigError(f"TrainConfig: log_every={self.log_every} must be > 0")
        if self.scale_mode not in SCALE_MODES:
            raise SAEConfigError(f"TrainConfig: unknown scale_mode {self.scale_mode!r} (known: {', '.join(SCALE_MODES)})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (betas as a list); ``from_dict(to_dict())`` equals the original."""
        out = asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; missing keys take defaults, unknown keys raise SAEConfigError."""
        return cls(**_from_mapping(cls, data, "TrainConfig"))


def config_diff(expected: SAEConfig | Mapping[str, Any], found: SAEConfig | Mapping[str, Any]) -> list[str]:
    """Human-readable differences ``"C: expected 4096, found 8192"`` between two SAE configs (empty if equal).

    Used by every loader so a mismatch error names the field rather than failing on a tensor shape.
    """
    a = expected.to_dict() if isinstance(expected, SAEConfig) else SAEConfig.from_dict(expected).to_dict()
    b = found.to_dict() if isinstance(found, SAEConfig) else SAEConfig.from_dict(found).to_dict()
    return [f"{key}: expected {a[key]!r}, found {b[key]!r}" for key in a if a[key] != b[key]]
