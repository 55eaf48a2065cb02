"""transformers-backed families: DINOv2 (with and without registers), DINOv3 ViT, SigLIP vision tower.

Loading is strict on purpose: transformers happily instantiates a model from a checkpoint of another type,
or fills missing weights with random values and only logs a report. Here any missing, unexpected (other
than a SigLIP text tower) or mis-shaped key, a ``model_type`` from another family, or an architecture that
differs from the registry entry raises :class:`WeightsMismatchError`, so a wrong path never becomes a silently
random encoder whose tokens end up in the store.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import transformers
from transformers import PretrainedConfig

from .base import Backbone, BackboneConfig, WeightsMismatchError, WeightsUnavailableError, hub_offline, not_cached
from .tiny import seeded


@dataclass(frozen=True)
class HFFamily:
    """How one registry family maps onto transformers classes."""

    model_cls: str  # transformers class name, resolved lazily
    config_cls: str
    model_types: tuple[str, ...]  # accepted ``model_type`` values in a checkpoint's config.json
    shape_keys: tuple[str, ...]  # config fields that must equal the registry's (they decide shapes/semantics)
    ignore_unexpected: tuple[str, ...] = ()  # regexes of checkpoint keys that may be left unused
    pos_embed_interp_kwarg: bool = False  # forward needs interpolate_pos_encoding=True off the native size
    final_norm: tuple[str, ...] = ()  # submodule path(s) of the norm that makes last_hidden_state; first found is used


_COMMON = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size")
FAMILIES: dict[str, HFFamily] = {
    # DINOv2 always interpolates its learned position grid (native 518 px = 37×37) to the input size.
    "dinov2": HFFamily("Dinov2Model", "Dinov2Config", ("dinov2",),
                       _COMMON + ("mlp_ratio", "use_swiglu_ffn", "image_size"), final_norm=("layernorm",)),
    "dinov2_registers": HFFamily("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", ("dinov2_with_registers",),
                                 _COMMON + ("mlp_ratio", "use_swiglu_ffn", "image_size", "num_register_tokens"),
                                 final_norm=("layernorm",)),
    # DINOv3 uses RoPE: any input size, no position table; 4 registers must be set explicitly (default 0).
    "dinov3": HFFamily("DINOv3ViTModel", "DINOv3ViTConfig", ("dinov3_vit",),
                       _COMMON + ("intermediate_size", "use_gated_mlp", "num_register_tokens"), final_norm=("norm",)),
    # Hub SigLIP checkpoints hold the full image-text model: the vision tower is taken, the text tower ignored.
    # Its post_layernorm sits at the top of SiglipVisionModel in transformers 5.24, under vision_model before.
    "siglip": HFFamily("SiglipVisionModel", "SiglipVisionConfig", ("siglip", "siglip_vision_model"),
                       _COMMON + ("intermediate_size", "image_size"),
                       ignore_unexpected=(r"^text_model\.", r"^logit_(scale|bias)$"), pos_embed_interp_kwarg=True,
                       final_norm=("post_layernorm", "vision_model.post_layernorm")),
}


def _tf(name: str):
    return getattr(transformers, name)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report while loading: we raise our own, stricter error instead."""
    logger = logging.getLogger("transformers")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def _norm(value):
    """Make config values comparable: lists -> tuples, a square int size -> (n, n)."""
    if isinstance(value, (list, tuple)):
        value = tuple(value)
        return value if len(value) != 2 or value[0] != value[1] else value[0]
    return value


def _looks_like_path(weights: str) -> bool:
    """A hub id is exactly ``org/name``; anything else with a separator or a leading ./ ~ is a local path."""
    return (weights.startswith(("/", ".", "~")) or weights.count("/") > 1 or "\\" in weights
            or weights.endswith((".safetensors", ".bin", ".pt", ".pth")))


def resolve_source(config: BackboneConfig, weights: str | None) -> tuple[str, bool]:
    """``weights`` (or the entry's hub id) -> (what to pass to from_pretrained, is it a local directory)."""
    if weights is None:
        return config.source, False
    path = Path(weights).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise WeightsMismatchError(
                f"weights {str(path)!r} for backbone {config.name!r} must be a transformers checkpoint directory "
                f"(config.json + model.safetensors, as written by save_pretrained / save_backbone)")
        return str(path), True
    if _looks_like_path(weights):
        raise WeightsUnavailableError(f"weights path {weights!r} for backbone {config.name!r} does not exist")
    return weights, False


def build_hf_config(config: BackboneConfig) -> PretrainedConfig:
    """The transformers config of a registry entry, from the hyper-parameters recorded in the registry."""
    return _tf(FAMILIES[config.family].config_cls)(**config.options["arch"])


def _check_checkpoint_config(config: BackboneConfig, family: HFFamily, source: str) -> PretrainedConfig:
    """Read the checkpoint's config (offline) and refuse another family or another architecture."""
    try:
        raw, _ = PretrainedConfig.get_config_dict(source)
    except (OSError, ValueError) as err:
        raise WeightsUnavailableError(
            f"cannot load weights for backbone {config.name!r} from {source!r}: not a local directory and not in "
            f"the Hugging Face cache (no network here). Pass --weights /path/to/checkpoint_dir with a "
            f"local copy of {config.source or 'the checkpoint'}. ({type(err).__name__}: {str(err)[:200]})") from err
    model_type = raw.get("model_type")
    if model_type not in family.model_types:
        raise WeightsMismatchError(
            f"weights {source!r} hold a {model_type!r} model, but backbone {config.name!r} (family {config.family}) "
            f"expects model_type in {list(family.model_types)}")
    ckpt = _tf(family.config_cls).from_pretrained(source)  # a composite SigLIP config yields its vision part
    ours = build_hf_config(config)
    diffs = {k: (_norm(getattr(ckpt, k, None)), _norm(getattr(ours, k))) for k in family.shape_keys
             if _norm(getattr(ckpt, k, None)) != _norm(getattr(ours, k))}
    if diffs:
        text = ", ".join(f"{k}: checkpoint {a!r} vs registry {b!r}" for k, (a, b) in sorted(diffs.items()))
        raise WeightsMismatchError(f"weights {source!r} do not match backbone {config.name!r}: {text}")
    return ckpt


def _check_loading_info(config: BackboneConfig, family: HFFamily, source: str, info: dict) -> None:
    """Reject anything transformers would only have logged: missing, unexpected or mis-shaped keys."""
    unexpected = sorted(k for k in info.get("unexpected_keys", ())
                        if not any(re.search(p, k) for p in family.ignore_unexpected))
    problems = {
        "missing": sorted(info.get("missing_keys", ())),
        "unexpected": unexpected,
        "mismatched shape": sorted(f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in info.get("mismatched_keys", ())),
        "errors": list(info.get("error_msgs", ())),
    }
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        text = "; ".join(f"{k} ({len(v)}): {', '.join(map(str, v[:5]))}{' …' if len(v) > 5 else ''}"
                         for k, v in problems.items())
        raise WeightsMismatchError(f"weights {source!r} do not fit backbone {config.name!r}: {text}")


def load_hf_model(config: BackboneConfig, weights: str | None) -> torch.nn.Module:
    """Build the transformers model of ``config``: seeded random init when untrained and no weights, else strict load."""
    family = FAMILIES[config.family]
    if config.untrained and weights is None:
        with seeded(config.options.get("seed", 0)):
            return _tf(family.model_cls)(build_hf_config(config))
    source, local = resolve_source(config, weights)
    if local:
        return _load(config, family, source)
    with hub_offline() as hub:  # not a local folder: the cache, and the hub only when it answers
        try:
            return _load(config, family, source)
        except (WeightsUnavailableError, OSError) as err:
            if hub.offline:
                raise not_cached(config.name, source) from err
            raise


def _load(config: BackboneConfig, family: HFFamily, source: str) -> torch.nn.Module:
    ckpt_config = _check_checkpoint_config(config, family, source)  # before the (slow) import of the model class
    model_cls = _tf(family.model_cls)
    try:
        with _quiet_transformers():
            model, info = model_cls.from_pretrained(source, config=ckpt_config, output_loading_info=True,
                                                    ignore_mismatched_sizes=True, dtype=torch.float32)
    except (RuntimeError, ValueError, KeyError) as err:  # e.g. unreadable or inconsistent state dict
        raise WeightsMismatchError(f"weights {source!r} could not be loaded into {config.name!r}: {err}") from err
    _check_loading_info(config, family, source, info)
    return model


def find_final_norm(model: torch.nn.Module, family: HFFamily) -> torch.nn.Module | None:
    """The module that turns the last block's output into ``last_hidden_state`` (None if the model has none)."""
    for path in family.final_norm:
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    return None


class HFBackbone(Backbone):
    """A transformers vision model; layer L = ``hidden_states[L]`` (block L's output, before the final norm);
    ``token="norm"``: the model's final norm applied to it (``last_hidden_state`` for the last layer)."""

    def __init__(self, config: BackboneConfig, model: torch.nn.Module, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.model = model.to(device).eval().requires_grad_(False)
        native = _norm(getattr(model.config, "image_size", None))
        family = FAMILIES[config.family]
        # SigLIP keeps a fixed position table; only ask for interpolation when the size actually differs.
        self._forward_kwargs = ({"interpolate_pos_encoding": True}
                                if family.pos_embed_interp_kwarg and native != config.image_size else {})
        self.final_norm = find_final_norm(self.model, family)
        self.has_final_norm = self.final_norm is not None

    def _forward_layers(self, x: torch.Tensor, layers: list[int], token: str = "block") -> dict[int, torch.Tensor]:
        # hidden_states holds references (no copies): [embeddings, block 1, ..., block N], prefix tokens first.
        states = self.model(pixel_values=x, output_hidden_states=True, **self._forward_kwargs).hidden_states
        b, p = x.shape[0], self.config.num_prefix_tokens
        hp, wp = x.shape[-2] // self.config.patch_size, x.shape[-1] // self.config.patch_size
        # "norm": the whole sequence through the model's final norm, as its forward does, then the prefix dropped
        out = {}
        for layer in layers:
            h = self.final_norm(states[layer]) if token == "norm" else states[layer]
            out[layer] = h[:, p:].reshape(b, hp, wp, -1)
        return out

    def save(self, path: str) -> str:
        """``save_pretrained`` directory (config.json + model.safetensors); loadable offline as ``weights``."""
        Path(path).mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        return str(path)


def create_hf_backbone(config: BackboneConfig, weights: str | None, device: torch.device) -> HFBackbone:
    return HFBackbone(config, load_hf_model(config, weights), device)
