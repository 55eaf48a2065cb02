"""OpenCLIP ViT image towers, built through ``open_clip.create_model`` exactly as open_clip users do.

Facts this module relies on (open_clip 3.3, read from the installed source):
- ``visual.forward_intermediates(x, indices=[...], output_fmt="NLC", intermediates_only=True)`` returns
  ``{"image_intermediates": [tensor [B, Hp*Wp, d], ...]}``: indices are 0-based block indices, the list follows
  block order (not the order asked), each entry is a block output before ``ln_post`` with the single class
  token already removed (open_clip hard-codes one prefix token). ``stop_early=True`` skips the later blocks.
  ``normalize_intermediates=True`` applies ``ln_post`` to each whole sequence before the class token is split off.
- ``visual.forward`` with ``output_tokens=True`` (no attention pool, ``final_ln_after_pool=False``: every CLIP
  ViT config here) returns ``ln_post`` of the last block's tokens, class token dropped, *not* projected by
  ``proj`` (only the pooled vector is): exactly the last layer's ``token="norm"`` output.
- ``create_model(name, pretrained=<file>)`` loads with ``strict=True`` after ``resize_pos_embed``, which
  interpolates a checkpoint's position grid to ``force_image_size`` (ViT-L/14@336 run at 518 px: 24² -> 37²).
- The OpenAI weights were trained with QuickGELU; the plain configs do not set it, so entries force it.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import open_clip
import torch
from open_clip import factory as oc_factory
from open_clip.transformer import VisionTransformer
from safetensors import safe_open
from safetensors.torch import save_file

from .base import Backbone, BackboneConfig, WeightsMismatchError, WeightsUnavailableError, hub_offline, not_cached
from .tiny import seeded

CHECKPOINT_NAME = "open_clip_model.safetensors"  # the file save_backbone writes inside a directory
_CHECKPOINT_NAMES = (CHECKPOINT_NAME, "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                     "open_clip_model.pt", "model.safetensors", "pytorch_model.bin", "model.pt")


def ensure_model_config(config: BackboneConfig) -> None:
    """Add an entry's own open_clip config (tiny variants) to open_clip's table, so create_model finds it by name.

    ``add_model_config`` only takes JSON files; the table itself is a module dict that open_clip rescans by
    merging, so an entry added here survives later ``add_model_config`` calls.
    """
    cfg = config.options.get("openclip_cfg")
    if cfg is not None and open_clip.get_model_config(config.source) is None:
        oc_factory._MODEL_CONFIGS[config.source] = copy.deepcopy(cfg)


def _resolve_pretrained(config: BackboneConfig, weights: str | None) -> tuple[str, bool]:
    """-> (what to pass as ``pretrained``: a tag or a checkpoint file, is it a tag)."""
    if weights is None:
        tag = config.options.get("pretrained")
        if tag is None:
            raise WeightsUnavailableError(f"backbone {config.name!r} has no default weights: pass --weights PATH_OR_TAG")
        return tag, True
    if weights in open_clip.list_pretrained_tags_by_model(config.source):
        return weights, True
    path = Path(weights).expanduser()
    if path.is_dir():
        for name in _CHECKPOINT_NAMES:
            if (path / name).is_file():
                return str(path / name), False
        raise WeightsMismatchError(
            f"directory {str(path)!r} for backbone {config.name!r} holds no open_clip checkpoint "
            f"(looked for {', '.join(_CHECKPOINT_NAMES)})")
    if path.is_file():
        return str(path), False
    tags = open_clip.list_pretrained_tags_by_model(config.source)
    raise WeightsUnavailableError(
        f"weights {weights!r} for backbone {config.name!r} is neither an existing file or directory nor a "
        f"pretrained tag of {config.source} (tags: {', '.join(tags) or 'none'})")


def _checkpoint_grid(path: str) -> int | None:
    """Side of the position grid stored in a checkpoint file, read lazily; None when it cannot be told cheaply."""
    key = "visual.positional_embedding"
    try:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                rows = f.get_slice(key).get_shape()[0] if key in f.keys() else None
        else:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            state = state.get("state_dict", state)
            tensor = state.get(key, state.get("module." + key))
            rows = None if tensor is None else tensor.shape[0]
    except Exception:  # an old or exotic format: leave it to open_clip's strict load
        return None
    side = math.isqrt(rows - 1) if rows else 0
    return side if rows and side * side == rows - 1 else None


def _check_grid(config: BackboneConfig, path: str) -> None:
    """open_clip silently interpolates any position grid; refuse one that is neither the model's native grid nor
    the grid we run at, which means weights of a sibling model (e.g. ViT-L-14 at 224 px for ViT-L-14-336)."""
    grid = _checkpoint_grid(path)
    native = open_clip.get_model_config(config.source)["vision_cfg"]["image_size"] // config.patch_size
    if grid is not None and grid not in (native, config.grid[0]):
        raise WeightsMismatchError(
            f"weights {path!r} have a {grid}x{grid} position grid (trained at {grid * config.patch_size} px); "
            f"{config.source} has {native}x{native}: they belong to another model than backbone {config.name!r}")


def load_openclip_model(config: BackboneConfig, weights: str | None) -> torch.nn.Module:
    """The full CLIP model (text tower kept so a saved checkpoint reloads strictly), on CPU, fp32."""
    ensure_model_config(config)
    kwargs = dict(force_image_size=config.image_size, force_quick_gelu=bool(config.options.get("quick_gelu")))
    pretrained, is_tag = (None, False) if config.untrained and weights is None else _resolve_pretrained(config, weights)
    if pretrained is None:
        with seeded(config.options.get("seed", 0)):
            return open_clip.create_model(config.source, pretrained=None, **kwargs)
    if not is_tag:
        _check_grid(config, pretrained)
    hub = hub_offline() if is_tag else None  # a tag comes from the cache, or from the hub when it answers
    try:
        if hub is None:
            return open_clip.create_model(config.source, pretrained=pretrained, **kwargs)
        with hub:
            return open_clip.create_model(config.source, pretrained=pretrained, **kwargs)
    except Exception as err:  # open_clip raises bare RuntimeError for download and strict-load failures alike
        if hub is not None and hub.offline:
            raise not_cached(config.name, pretrained) from err
        if is_tag and "download" in str(err).lower():
            raise WeightsUnavailableError(
                f"cannot load pretrained tag {pretrained!r} of {config.source} for backbone {config.name!r}: not "
                f"cached and no network here. Pass --weights /path/to/checkpoint with a local "
                f"open_clip state dict (.safetensors/.bin/.pt). ({str(err)[:200]})") from err
        raise WeightsMismatchError(
            f"weights {pretrained!r} do not fit backbone {config.name!r} ({config.source}): {str(err)[:600]}") from err


class OpenClipBackbone(Backbone):
    """The image tower of an open_clip CLIP; layer L = output of residual block L, class token dropped;
    ``token="norm"``: ``ln_post`` applied to it (open_clip's ``output_tokens`` for the last layer, before ``proj``)."""

    def __init__(self, config: BackboneConfig, clip: torch.nn.Module, device: torch.device) -> None:
        visual = clip.visual
        if not isinstance(visual, VisionTransformer):
            raise ValueError(f"{config.name}: only open_clip's own ViT towers are supported, got {type(visual).__name__}")
        found = (visual.transformer.width, len(visual.transformer.resblocks), visual.patch_size[0], visual.image_size[0])
        expected = (config.dim, config.num_layers, config.patch_size, config.image_size)
        if found != expected:
            raise ValueError(f"{config.name}: open_clip built (width, layers, patch, size)={found}, registry says {expected}")
        self.config = config
        self.device = device
        self.clip = clip.eval().requires_grad_(False)  # the text tower stays on CPU; only the image tower moves
        self.visual = visual.to(device)
        # token="norm" = the tokens open_clip itself outputs; with an attention pool or a norm after pooling those
        # are not ln_post(block tokens), so such towers do not offer it
        self.has_final_norm = (visual.attn_pool is None and not visual.final_ln_after_pool
                               and not isinstance(visual.ln_post, torch.nn.Identity))

    def _forward_layers(self, x: torch.Tensor, layers: list[int], token: str = "block") -> dict[int, torch.Tensor]:
        indices = sorted({layer - 1 for layer in layers})
        out = self.visual.forward_intermediates(x, indices=indices, stop_early=True, intermediates_only=True,
                                                output_fmt="NLC", normalize_intermediates=token == "norm")
        by_index = dict(zip(indices, out["image_intermediates"]))  # returned in block order = sorted order
        b = x.shape[0]
        hp, wp = x.shape[-2] // self.config.patch_size, x.shape[-1] // self.config.patch_size
        return {layer: by_index[layer - 1].reshape(b, hp, wp, -1) for layer in layers}

    def save(self, path: str) -> str:
        """Full CLIP state dict as safetensors (open_clip loads it by extension); ``path`` is a directory or a
        ``.safetensors`` file. Returns the file written, usable as ``weights``."""
        target = Path(path)
        if target.suffix != ".safetensors":
            target.mkdir(parents=True, exist_ok=True)
            target = target / CHECKPOINT_NAME
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.clip.state_dict().items()}
        save_file(state, str(target), metadata={"format": "pt", "open_clip_model": self.config.source})
        return str(target)


def create_openclip_backbone(config: BackboneConfig, weights: str | None, device: torch.device) -> OpenClipBackbone:
    return OpenClipBackbone(config, load_openclip_model(config, weights), device)
