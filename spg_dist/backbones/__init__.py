"""Frozen image encoders behind one interface (see :mod:`spg_dist.backbones.base`).

``create_backbone(name, weights=..., device=...)`` builds any registry entry; ``backbone.encode(uint8 images,
layers, token="block"|"norm")`` returns ``{layer: [B, Hp, Wp, d]}`` patch grids with CLS/register tokens dropped,
before (``"block"``) or after (``"norm"``) the model's final norm (:data:`TOKEN_CHOICES`). Nothing here
downloads at import time, and model libraries (transformers, open_clip) load only when a model is built.
"""

from .base import (
    TOKEN_CHOICES,
    NoFinalNormError,
    TokenChoiceError,
    resolve_layers,
    Backbone,
    BackboneConfig,
    PreprocessSpec,
    UnknownBackboneError,
    WeightsMismatchError,
    WeightsUnavailableError,
)
from .registry import (
    RANDOM_SUFFIX,
    RANDOM_WEIGHTS,
    check_weights,
    create_backbone,
    get_config,
    list_backbones,
    register_backbone,
    save_backbone,
)

__all__ = [
    "TOKEN_CHOICES", "NoFinalNormError", "TokenChoiceError", "Backbone", "BackboneConfig", "resolve_layers",
    "PreprocessSpec", "UnknownBackboneError", "WeightsMismatchError",
    "WeightsUnavailableError", "RANDOM_SUFFIX", "RANDOM_WEIGHTS", "check_weights", "create_backbone", "get_config",
    "list_backbones", "register_backbone", "save_backbone",
]
