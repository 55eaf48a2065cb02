"""The one table of backbones and the one factory (in the spirit of open_clip's model table + create_model).

Every entry records the architecture hyper-parameters itself, so the registry answers "what grid, what
dimension, how many prefix tokens" without building or downloading anything, and a local checkpoint is
checked against these numbers when it is loaded. Model libraries are imported only when a backbone is built,
so CPU-side code (resize workers) can read ``get_config(name).preprocess`` cheaply.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from .base import Backbone, BackboneConfig, UnknownBackboneError
from .classical import CLASSICAL_CONFIGS
from .tiny import HALF, IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD, TINY_CONFIGS

RANDOM_WEIGHTS = "random"  # weights=RANDOM_WEIGHTS: a real architecture with seeded random init (benchmarks)
RANDOM_SUFFIX = "@random"  # ... and the name such a backbone reports (also accepted by get_config/create_backbone)
HF_FAMILIES = ("dinov2", "dinov2_registers", "dinov3", "siglip")
FAMILIES = HF_FAMILIES + ("openclip", "classical")  # classical: fixed filter banks, no weights

_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}  # ViT hidden size, blocks, heads


def _dinov2(size: str, registers: bool) -> BackboneConfig:
    hidden, layers, heads = _SIZES[size]
    word = {"s": "small", "b": "base", "l": "large"}[size]
    arch = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads, "mlp_ratio": 4,
            "patch_size": 14, "image_size": 518, "use_swiglu_ffn": False, "layer_norm_eps": 1e-6}
    if registers:
        arch["num_register_tokens"] = 4
    return BackboneConfig(
        name=f"dinov2{'-reg' if registers else ''}-vit{size}14",
        family="dinov2_registers" if registers else "dinov2",
        source=f"facebook/dinov2-{'with-registers-' if registers else ''}{word}",
        image_size=448, patch_size=14, dim=hidden, num_layers=layers, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        num_prefix_tokens=5 if registers else 1,
        description=f"DINOv2 ViT-{size.upper()}/14{' with 4 registers' if registers else ''} (LVD-142M); "
                    f"448 px -> 32x32x{hidden}; position grid interpolated from 518 px",
        options={"arch": arch},
    )


def _dinov3(size: str) -> BackboneConfig:
    hidden, layers, heads = _SIZES[size]
    arch = {"hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "patch_size": 16, "num_register_tokens": 4, "use_gated_mlp": False,
            "layer_norm_eps": 1e-5, "rope_theta": 100.0}
    return BackboneConfig(
        name=f"dinov3-vit{size}16", family="dinov3", source=f"facebook/dinov3-vit{size}16-pretrain-lvd1689m",
        image_size=448, patch_size=16, dim=hidden, num_layers=layers, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        num_prefix_tokens=5, resample="bilinear",
        description=f"DINOv3 ViT-{size.upper()}/16 (LVD-1689M); CLS + 4 registers dropped; 448 px -> 28x28x{hidden}",
        options={"arch": arch},
    )


def _openclip(name: str, source: str, image_size: int, patch: int, dim: int, layers: int, note: str) -> BackboneConfig:
    return BackboneConfig(
        name=name, family="openclip", source=source, image_size=image_size, patch_size=patch, dim=dim,
        num_layers=layers, mean=OPENAI_MEAN, std=OPENAI_STD, num_prefix_tokens=1, description=note,
        options={"pretrained": "openai", "quick_gelu": True},  # OpenAI weights were trained with QuickGELU
    )


_REAL: list[BackboneConfig] = [
    *(_dinov2(s, registers=False) for s in "sbl"),
    *(_dinov2(s, registers=True) for s in "sbl"),
    *(_dinov3(s) for s in "sbl"),
    BackboneConfig(
        name="siglip-l16-384", family="siglip", source="google/siglip-large-patch16-384", image_size=384,
        patch_size=16, dim=1024, num_layers=24, mean=HALF, std=HALF, num_prefix_tokens=0,
        description="SigLIP ViT-L/16 image tower at 384 px -> 24x24x1024 (no class token)",
        options={"arch": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "image_size": 384, "patch_size": 16}},
    ),
    _openclip("openclip-vitl14-336", "ViT-L-14-336", 518, 14, 1024, 24,
              "OpenCLIP ViT-L/14@336 (OpenAI weights) run at 518 px -> 37x37x1024; position grid resized from 24x24"),
    _openclip("openclip-vitb32", "ViT-B-32", 224, 32, 768, 12, "OpenCLIP ViT-B/32 (OpenAI weights), 224 px -> 7x7x768"),
]

_REGISTRY: dict[str, BackboneConfig] = {}
_ALIASES: dict[str, str] = {}  # hub ids / open_clip names -> registry names


def register_backbone(config: BackboneConfig, overwrite: bool = False) -> None:
    """Add an entry (e.g. a fine-tuned checkpoint's architecture). Refuses silent replacement of a name."""
    if config.family not in FAMILIES:
        raise ValueError(f"unknown family {config.family!r} (known: {', '.join(FAMILIES)})")
    if config.image_size % config.patch_size:
        raise ValueError(f"{config.name}: image_size {config.image_size} is not a multiple of patch {config.patch_size}")
    if config.family in HF_FAMILIES and "arch" not in config.options:
        raise ValueError(f"{config.name}: transformers families need options['arch'] (config hyper-parameters)")
    if config.name in _REGISTRY and not overwrite:
        raise ValueError(f"backbone {config.name!r} is already registered")
    _REGISTRY[config.name] = config
    if config.source and not config.untrained:
        _ALIASES.setdefault(config.source, config.name)


for _cfg in (*_REAL, *CLASSICAL_CONFIGS, *TINY_CONFIGS):
    register_backbone(_cfg)


def list_backbones() -> list[str]:
    """Registry names, real entries first, then the untrained tiny ones."""
    return list(_REGISTRY)


def _random_variant(config: BackboneConfig) -> BackboneConfig:
    """A real architecture with seeded random weights, renamed so its tokens never pass for the trained model's."""
    if config.untrained:
        return config
    return replace(config, name=f"{config.name}{RANDOM_SUFFIX}", untrained=True,
                   description=f"RANDOM INIT (no weights loaded, seeded) of: {config.description}",
                   options={**config.options, "seed": 0})


def get_config(name: str) -> BackboneConfig:
    """The entry for a registry name (or a hub id / open_clip name of a real entry; ``<name>@random`` for its
    random-init variant); nothing is built."""
    base = name[: -len(RANDOM_SUFFIX)] if name.endswith(RANDOM_SUFFIX) else name
    config = _REGISTRY.get(base) or _REGISTRY.get(_ALIASES.get(base, ""))
    if config is None:
        from spg_dist.errors import did_you_mean

        raise UnknownBackboneError(f"unknown backbone {name!r}; {did_you_mean(base, list(_REGISTRY))}"
                                   f"known: {', '.join(_REGISTRY)} (`spg backbones` describes them)")
    return _random_variant(config) if base != name else config


def _builder(family: str) -> Callable[[BackboneConfig, str | None, torch.device], Backbone]:
    if family == "classical":
        from .classical import create_classical_backbone
        return create_classical_backbone
    if family == "openclip":
        from .openclip import create_openclip_backbone
        return create_openclip_backbone
    from .hf import create_hf_backbone
    return create_hf_backbone


def create_backbone(name: str, weights: str | None = None, device: str | torch.device = "cpu",
                    image_size: int | None = None) -> Backbone:
    """Build a frozen backbone (eval mode, no grad) on ``device``.

    ``weights``: None = the entry's default (hub id / pretrained tag; tiny entries: their seeded random init);
    a local checkpoint directory or file (strictly checked, :class:`WeightsMismatchError` otherwise); a hub
    id or open_clip tag; or ``"random"`` for the real architecture with seeded random weights, which renames
    the backbone ``<name>@random`` so its tokens are never mistaken for the trained model's.
    ``image_size`` overrides the entry's input size (a multiple of the patch size).
    """
    config = get_config(name)
    if image_size is not None and image_size != config.image_size:
        if image_size <= 0 or image_size % config.patch_size:
            raise ValueError(f"image_size {image_size} must be a positive multiple of {config.name}'s patch "
                             f"size {config.patch_size}")
        config = replace(config, image_size=image_size)
    if weights == RANDOM_WEIGHTS:
        weights, config = None, _random_variant(config)
    return _builder(config.family)(config, weights, torch.device(device))


def save_backbone(backbone: Backbone, path: str) -> str:
    """Write ``backbone``'s weights so that ``create_backbone(name, weights=<returned path>)`` reloads them exactly.

    transformers families: a ``save_pretrained`` directory. open_clip: a safetensors state dict of the whole
    CLIP (in ``path`` if it ends in .safetensors, else ``path``/open_clip_model.safetensors).
    """
    return backbone.save(str(path))


def check_weights(name: str, weights: str | None = None) -> None:
    """The cheap part of loading, for a driver before it starts a cluster: a missing path, another model
    family or another architecture fails here in milliseconds instead of inside every actor of a pool.

    Reads only the checkpoint's config (transformers) or tensor header (open_clip); never the weights.
    """
    config = get_config(name)
    if config.family == "classical":  # no weights at all: None passes, anything else (even "random") is refused
        from .classical import check_classical_weights
        return check_classical_weights(config, weights)
    if weights == RANDOM_WEIGHTS or (config.untrained and weights is None):
        return
    if config.family == "openclip":
        from .openclip import _check_grid, _resolve_pretrained, ensure_model_config

        ensure_model_config(config)
        pretrained, is_tag = _resolve_pretrained(config, weights)
        if not is_tag:
            _check_grid(config, pretrained)
        return
    from .hf import FAMILIES, _check_checkpoint_config, resolve_source

    source, _ = resolve_source(config, weights)
    _check_checkpoint_config(config, FAMILIES[config.family], source)
