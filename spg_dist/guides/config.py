"""Stage 2 settings (SPG.md "Stage 2: guides"): the paper's defaults, and the preset that works on the offline
classical encoder (issue 5). A config round-trips through JSON exactly and is stored with every guide pair."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from spg_dist.errors import SpgError

NONNEG = ("relu", "topk")
PRESET_PREPROCESSING = {"paper": "none", "classical": "standardize,constant"}
"""The SAE token preprocessing each guide preset is meant for (``spg train-sae --preprocess``). The paper feeds
ViT tokens as they are. On the classical encoder, per-dimension standardisation + the appended constant (see
``spg_dist.sae.preprocess``) lifted the weak demo direction (textures -> objects) from 0.698 to 0.723 pixel
AUROC (3 seeds) at a cost of 0.024 in the strong one; per-image centring lowered both there (README, "Token
preprocessing")."""
LOSSES = ("focal_dice", "bce_dice")


class GuideConfigError(SpgError, ValueError):
    """An invalid guide setting; one line naming the field."""


@dataclass(frozen=True)
class GuideConfig:
    nonneg: str = "relu"  # relu (+ L1 keeps the active sets small) | topk (k_g largest coefficients)
    k_g: int | None = None  # with nonneg="topk"
    temperature: float = 0.07  # T of the two-class softmax over cosine logits
    loss: str = "focal_dice"  # focal_dice (paper) | bce_dice (class-balanced BCE + Dice)
    focal_gamma: float = 2.0
    lambda_dice: float = 1.0
    beta_l1: float = 0.01
    lr: float = 1e-3
    batch_images: int = 16
    steps: int = 500
    ema: float = 0.999  # decay of the EMA of the coefficients used at evaluation
    subtract_b_pre: bool = True  # cosine on (token - b_pre), as the SAE sees it; off keeps magnitude cues
    init: float = 0.01  # initial coefficient value (plus small seeded noise): ReLU needs them positive
    seed: int = 0

    def __post_init__(self) -> None:
        if self.nonneg not in NONNEG:
            raise GuideConfigError(f"GuideConfig: nonneg={self.nonneg!r}, use one of {NONNEG}")
        if self.nonneg == "topk" and (not isinstance(self.k_g, int) or self.k_g <= 0):
            raise GuideConfigError(f"GuideConfig: nonneg='topk' needs k_g > 0, got {self.k_g!r}")
        if self.loss not in LOSSES:
            raise GuideConfigError(f"GuideConfig: loss={self.loss!r}, use one of {LOSSES}")
        if not self.temperature > 0:
            raise GuideConfigError(f"GuideConfig: temperature={self.temperature!r} must be > 0")
        if not 0 <= self.ema < 1:
            raise GuideConfigError(f"GuideConfig: ema={self.ema!r} must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GuideConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GuideConfigError(f"GuideConfig: unknown field(s) {unknown}")
        return cls(**dict(data))

    @classmethod
    def preset(cls, name: str) -> "GuideConfig":
        """``paper``: SPG's settings. ``classical``: what transferred on the classical texture encoder (issue 5's
        study: class-balanced BCE + Dice at T = 0.2, lr 1e-2, ~150 steps, b_pre kept in the cosine)."""
        if name == "paper":
            return cls()
        if name == "classical":
            return cls(loss="bce_dice", temperature=0.2, lr=1e-2, steps=150, subtract_b_pre=False)
        raise GuideConfigError(f"unknown guide preset {name!r}; use paper or classical")
