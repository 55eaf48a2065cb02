"""Stage 2 settings (the paper's "Stage 2: guides"): the paper's defaults, and the preset that works on the offline
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


LEGACY_DEFAULTS = {"ema_warmup": True, "l1_with_topk": True}
"""What a stored config without these keys was trained with: before the fields existed the EMA always had the
warm-up and the L1 term was always in the loss. :meth:`GuideConfig.from_dict` fills them in, so an old row loads
as the behaviour it was trained with (the dataclass defaults are the paper's)."""


@dataclass(frozen=True)
class GuideConfig:
    """One guide training run. The defaults are the paper's (the paper's Stage 2), = :meth:`preset` ``("paper")``."""

    nonneg: str = "relu"  # relu (+ L1 keeps the active sets small) | topk (k_g largest coefficients)
    k_g: int | None = None  # with nonneg="topk"
    temperature: float = 0.07  # T of the two-class softmax over cosine logits
    loss: str = "focal_dice"  # focal_dice (paper) | bce_dice (class-balanced BCE + Dice)
    focal_gamma: float = 2.0
    lambda_dice: float = 1.0
    beta_l1: float = 0.01  # β of the L1 term; only in the loss with nonneg="relu" unless l1_with_topk
    lr: float = 1e-3
    batch_images: int = 16
    steps: int = 5000  # 0.999**5000 = 0.0067: the plain EMA keeps < 1 % of the initial coefficients (needs >= 4603)
    ema: float = 0.999  # decay of the EMA of the coefficients used at evaluation
    ema_warmup: bool = False  # False: the paper's plain EMA z_ema = ema·z_ema + (1-ema)·z from the first step;
    # True: warm-up decay_t = min(ema, (1+t)/(10+t)), for short runs (a plain 0.999 EMA of 150 steps is ~86 % init)
    subtract_b_pre: bool = False  # False: Eq. 9 exactly, cos(f, g) on the token after the SAE's own preprocessing;
    # True: cos(f - b_pre, g), the token centred as the SAE's encoder sees it (an option, not the paper)
    l1_with_topk: bool = False  # nonneg="topk": the supplement's TopK variant has no L1 term; True adds β·L1 anyway
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
        for name in ("ema_warmup", "subtract_b_pre", "l1_with_topk"):
            if not isinstance(getattr(self, name), bool):
                raise GuideConfigError(f"GuideConfig: {name}={getattr(self, name)!r} must be true or false")

    @property
    def l1_in_loss(self) -> bool:
        """Whether β·(‖z̃_N‖₁ + ‖z̃_A‖₁) is part of the loss: ReLU guides (paper), TopK only with ``l1_with_topk``."""
        return self.nonneg == "relu" or self.l1_with_topk

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GuideConfig":
        """Inverse of :meth:`to_dict`; keys missing from an older row take :data:`LEGACY_DEFAULTS` (the behaviour
        it was trained with), other missing keys the dataclass defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GuideConfigError(f"GuideConfig: unknown field(s) {unknown}")
        return cls(**{**LEGACY_DEFAULTS, **dict(data)})

    @classmethod
    def preset(cls, name: str) -> "GuideConfig":
        """``paper``: SPG's settings, = ``GuideConfig()``: focal + Dice at T = 0.07, β = 0.01, Adam lr 1e-3, batch 16;
        Eq. 9 exactly (cos(f, g) on the preprocessed token, no b_pre subtracted); the plain 0.999 EMA with no
        warm-up, and 5000 steps so that the initial coefficients weigh 0.999^5000 = 0.67 % (< 1 %, which needs
        >= 4603 steps) in the evaluated EMA. ``classical``: what transferred on the classical texture encoder
        (issue 5's study: class-balanced BCE + Dice at T = 0.2, lr 1e-2, ~150 steps, b_pre kept in the cosine), with
        the EMA warm-up, without which 150 steps of a 0.999 EMA would still be ~86 % the initialisation."""
        if name == "paper":
            return cls()
        if name == "classical":
            return cls(loss="bce_dice", temperature=0.2, lr=1e-2, steps=150, subtract_b_pre=False, ema_warmup=True)
        raise GuideConfigError(f"unknown guide preset {name!r}; use paper or classical")
