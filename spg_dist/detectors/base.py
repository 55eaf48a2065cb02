"""The one interface every detector sits behind, and the data it is fitted and scored on.

A detector declares what it reads (:class:`Inputs`: which stored layers; few-shot normal images of the target
category, the unlabelled target test set, a labelled auxiliary dataset, paired corrupted tokens, or pixels through
a backbone of its own), is fitted on a :class:`FitData`, and turns a :class:`TokenSet` of test images into patch
scores ``[M, h, w]`` on the token grid. The evaluation loop (``spg_dist.stages.evaluate``) does the rest the same
way for every detector: upsampling to the evaluation resolution, pooling (:attr:`Detector.pooling`, over the map
or the patch grid), masks and metrics. Pure PyTorch/NumPy: no store, no Ray.

Settings are a frozen dataclass per detector (``Settings``), built from ``--param key=value`` strings by
:func:`settings_from`: typed, validated, unknown keys refused, recorded as JSON with every result.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Union

import numpy as np
import torch

from spg_dist.errors import SpgError
from spg_dist.evaluation.pooling import pool

ArrayLike = Union[np.ndarray, torch.Tensor]
SCOPES = ("category", "dataset")


class DetectorConfigError(SpgError, ValueError):
    """A detector setting that is unknown or invalid; one line naming it."""


@dataclass(frozen=True)
class Inputs:
    """What a detector reads from the store (the evaluation loop gathers exactly this, nothing more).

    ``layers``: stored token layers (negative counts from the deepest stored layer of the backbone); empty for a
    detector that runs its own backbone. ``shots``: normal *train* images of each target category (few-shot).
    ``unlabelled_target``: the target category's test images, labels hidden (transductive, MuSc-style).
    ``aux``: a labelled auxiliary dataset (tokens, image labels, masks at ``mask_size``). ``corruptions``: tokens of
    corrupted copies of the shots, paired with their clean tokens and corruption masks (FoundAD). ``images``: the
    image files themselves (a detector with a backbone in its loop). ``scope``: fit once per target ``category``
    or once per target ``dataset`` (category-agnostic: the shots of every category together).
    """

    layers: tuple[int, ...] = (-1,)
    shots: int = 0
    unlabelled_target: bool = False
    aux: bool = False
    corruptions: bool = False
    images: bool = False
    scope: str = "category"
    mask_size: int | None = None  # resolution of the aux masks fit() sees (None: 4 x the token grid)

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise DetectorConfigError(f"Inputs.scope={self.scope!r}: use one of {SCOPES}")
        if self.corruptions and not self.shots:
            raise DetectorConfigError("Inputs: corruptions are made from the shots; set shots > 0")


@dataclass
class TokenSet:
    """Images as a detector sees them: tokens per layer ``{layer: [N, h, w, d]}`` (fp16 or float) and metadata.

    ``masks`` ``[N, H, W]`` uint8 where the images are labelled (aux sets, corruptions); ``labels`` 1 = anomalous,
    ``-1`` = hidden. ``image_uris`` where pixels are needed. ``source_ids``: for corrupted images, the clean image
    each was made from (its tokens are ``clean``).
    """

    tokens: dict[int, np.ndarray]
    image_ids: list[str]
    categories: list[str]
    labels: np.ndarray
    masks: np.ndarray | None = None
    image_uris: list[str] | None = None
    source_ids: list[str] | None = None
    clean: "TokenSet | None" = None

    def __post_init__(self) -> None:
        n = len(self.image_ids)
        for layer, t in self.tokens.items():
            if t.ndim != 4 or t.shape[0] != n:
                raise ValueError(f"TokenSet: layer {layer} tokens of shape {t.shape} for {n} images")

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def layers(self) -> list[int]:
        return sorted(self.tokens)

    def layer(self, i: int = -1) -> np.ndarray:
        """Tokens of the ``i``-th stored layer in ascending order (-1: the deepest one read)."""
        return self.tokens[self.layers[i]]

    @property
    def grid(self) -> tuple[int, int]:
        t = self.layer()
        return int(t.shape[1]), int(t.shape[2])

    def subset(self, index: np.ndarray | list[int]) -> "TokenSet":
        idx = np.asarray(index, dtype=np.int64)
        pick = (lambda xs: [xs[i] for i in idx]) if len(idx) else (lambda xs: [])
        return TokenSet({k: v[idx] for k, v in self.tokens.items()}, pick(self.image_ids), pick(self.categories),
                        np.asarray(self.labels)[idx], None if self.masks is None else self.masks[idx],
                        None if self.image_uris is None else pick(self.image_uris),
                        None if self.source_ids is None else pick(self.source_ids), self.clean)


@dataclass
class FitData:
    """What :meth:`Detector.fit` receives; only the parts its :class:`Inputs` asked for are set."""

    shots: TokenSet | None = None
    unlabelled: TokenSet | None = None
    aux: TokenSet | None = None
    corrupted: TokenSet | None = None
    category: str | None = None  # the target category being fitted (scope "category"), else None
    extra: dict[str, Any] = field(default_factory=dict)

    def need(self, part: str, who: str) -> TokenSet:
        value = getattr(self, part)
        if value is None or len(value) == 0:
            raise DetectorConfigError(f"{who} needs {part} data to fit, and got none")
        return value


def to_tensor(x: ArrayLike, device: str | torch.device = "cpu") -> torch.Tensor:
    """Convert to a float32 torch tensor on ``device``."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        t = torch.as_tensor(np.asarray(x))
    return t.to(device=device, dtype=torch.float32)


def check_tokens(t: torch.Tensor, name: str = "tokens") -> None:
    if t.ndim != 4:
        raise ValueError(f"{name} must have shape [N, h, w, d], got {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty")


def l2_normalize(t: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise along the last dimension."""
    return t / t.norm(dim=-1, keepdim=True).clamp_min(eps)


def image_score(patch_scores: ArrayLike, top_fraction: float = 0.01) -> np.ndarray:
    """Mean of the top ``top_fraction`` patch scores per image (at least one patch), as AnomalyDINO: ``[M]``."""
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError("top_fraction must be in (0, 1]")
    s = patch_scores.detach().cpu().numpy() if isinstance(patch_scores, torch.Tensor) else np.asarray(patch_scores)
    if s.ndim < 2:
        raise ValueError(f"patch_scores must be [M, h, w], got shape {s.shape}")
    return pool(s, f"top:{100 * top_fraction:g}%")


# ------------------------------------------------------------------------------------------------- settings
def _coerce(value: Any, kind: Any, name: str) -> Any:
    """A ``--param`` string (or a JSON value) as the dataclass field's type."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Union:  # Optional[X] / X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name) if len(inner) == 1 else value
    if origin in (tuple, list):
        items = value.split(",") if isinstance(value, str) else list(value)
        inner = args[0] if args else str
        out = [_coerce(v.strip() if isinstance(v, str) else v, inner, name) for v in items if str(v).strip()]
        return tuple(out) if origin is tuple else out
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
        if kind is str:
            return str(value)
    except (TypeError, ValueError):
        raise DetectorConfigError(f"setting {name}={value!r}: expected {getattr(kind, '__name__', kind)}") from None
    return value


def settings_from(cls: type, values: Mapping[str, Any] | None = None) -> Any:
    """An instance of the frozen dataclass ``cls`` from strings or JSON values; unknown keys are refused."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise DetectorConfigError(f"unknown setting(s) {', '.join(unknown)} for {cls.__qualname__.split('.')[0]}; "
                                  f"known: {', '.join(known) or 'none'}")
    return cls(**{k: _coerce(v, hints[k], k) for k, v in values.items()})


def settings_dict(settings: Any) -> dict[str, Any]:
    """JSON-able dict of a settings dataclass (tuples as lists, NaN-free)."""
    def clean(v: Any) -> Any:
        if isinstance(v, tuple):
            return [clean(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        return v
    return {k: clean(v) for k, v in dataclasses.asdict(settings).items()}


class Detector(abc.ABC):
    """A patch-level anomaly detector over stored tokens; see the module docstring.

    Subclasses set ``name`` (the registry key), ``summary`` (one line for listings) and a frozen ``Settings``
    dataclass, and implement :meth:`inputs`, :meth:`fit` and :meth:`score`. ``pooling`` (a spec of
    :func:`spg_dist.evaluation.pooling.pool`) and ``pool_on`` (``"patches"``: on the token grid; ``"map"``: on the
    upsampled map) say how an image score is made. Detectors with learned state also implement
    :meth:`state_dict` / :meth:`load_state_dict` (tensors only: stored as safetensors).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Settings: ClassVar[type]
    trainable: ClassVar[bool] = False  # True: fit() learns weights worth storing (state_dict)

    def __init__(self, settings: Any = None, **overrides: Any) -> None:
        """``Settings`` as given, or built from ``overrides`` (strings allowed: ``--param`` values)."""
        if settings is None:
            settings = settings_from(self.Settings, overrides)
        elif overrides:
            parsed = settings_from(self.Settings, overrides)
            settings = dataclasses.replace(settings, **{k: getattr(parsed, k) for k in overrides})
        self.settings = settings

    # what the loop needs to know
    @abc.abstractmethod
    def inputs(self) -> Inputs:
        """What this detector reads (see :class:`Inputs`)."""

    @property
    def pooling(self) -> str:
        return getattr(self.settings, "pooling", "top:1%")

    @property
    def pool_on(self) -> str:
        return "patches"

    def params(self) -> dict[str, Any]:
        """Settings as JSON-able values (recorded with every ``eval_results`` row)."""
        return settings_dict(self.settings)

    # the method
    @abc.abstractmethod
    def fit(self, data: FitData) -> "Detector":
        """Fit on what :meth:`inputs` asked for; returns ``self``."""

    @abc.abstractmethod
    def score(self, batch: TokenSet) -> np.ndarray:
        """Patch anomaly scores ``[M, h, w]`` float32 (higher = more anomalous) on the token grid."""

    def postprocess_maps(self, maps: np.ndarray) -> np.ndarray:
        """Maps ``[M, H, W]`` at the evaluation resolution, before pooling and metrics (e.g. Gaussian smoothing);
        identity by default."""
        return maps

    def image_scores(self, scores: ArrayLike) -> np.ndarray:
        """``[M]`` image scores from patch scores (or maps, when ``pool_on == "map"``)."""
        return pool(scores, self.pooling)

    # learned state (trainable detectors)
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise DetectorConfigError(f"detector {self.name!r} has no learned state to load")

    def describe(self) -> str:
        return f"{self.name} {json.dumps(self.params(), sort_keys=True)}"


__all__ = ["ArrayLike", "Detector", "DetectorConfigError", "FitData", "Inputs", "SCOPES", "TokenSet", "check_tokens",
           "image_score", "l2_normalize", "settings_dict", "settings_from", "to_tensor"]
