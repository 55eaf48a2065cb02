"""The one interface every frozen encoder sits behind.

The extraction pipeline only knows this interface: it resizes images on CPU to ``spec.image_size`` (uint8,
HWC), hands batches to :meth:`Backbone.encode`, and stores the returned patch grids. Normalisation happens
inside ``encode`` on the model's device, so the CPU side ships compact uint8 and never needs the model's
statistics beyond the resize size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

import torch

from spg_dist.errors import SpgError


class UnknownBackboneError(SpgError, KeyError):
    """Raised for a backbone name not in the registry; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want one readable line
        return str(self.args[0]) if self.args else ""


class WeightsMismatchError(SpgError, ValueError):
    """Raised when a weights path does not fit the backbone's config (never a silent random init)."""


class TokenChoiceError(SpgError, ValueError):
    """Raised for a ``token`` argument of :meth:`Backbone.encode` that is not one of :data:`TOKEN_CHOICES`."""


class NoFinalNormError(TokenChoiceError):
    """Raised for ``token="norm"`` on a backbone whose family has no final norm (e.g. the classical filter bank)."""


class WeightsUnavailableError(SpgError, FileNotFoundError):
    """Raised when weights cannot be found: a local path that does not exist, or a hub id / pretrained tag that
    is neither cached nor downloadable (offline). The message names what was tried and how to pass a local path."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


_REACHABLE: dict[tuple[str, int], bool] = {}


def hub_reachable(timeout: float = 1.0) -> bool:
    """Whether the Hugging Face hub can be reached: False under HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, else one TCP
    connection to the hub (``HF_ENDPOINT`` or huggingface.co:443) within ``timeout`` seconds, name lookup included
    (remembered for the process). Lets a load without network fail in a second instead of minutes of retries."""
    import os
    import socket
    import threading
    from urllib.parse import urlparse

    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE")):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    key = (url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443))
    if key not in _REACHABLE:
        ok: list[bool] = []

        def probe() -> None:
            try:
                socket.create_connection(key, timeout=timeout).close()
                ok.append(True)
            except OSError:
                pass

        t = threading.Thread(target=probe, daemon=True)  # a name lookup ignores the socket timeout
        t.start()
        t.join(timeout + 0.5)
        _REACHABLE[key] = bool(ok)
    return _REACHABLE[key]


class hub_offline:
    """Within the block the Hugging Face hub is used offline (local cache only, no retries) when it is unreachable;
    ``.offline`` says which. Restores the previous setting on exit."""

    def __enter__(self) -> "hub_offline":
        import os

        self.offline = not hub_reachable()
        self._saved = None
        if self.offline:
            try:
                import huggingface_hub.constants as hf_constants
            except ImportError:  # pragma: no cover - transformers and open_clip depend on it
                hf_constants = None
            self._saved = (os.environ.get("HF_HUB_OFFLINE"), hf_constants,
                           getattr(hf_constants, "HF_HUB_OFFLINE", None))
            os.environ["HF_HUB_OFFLINE"] = "1"
            if hf_constants is not None:
                hf_constants.HF_HUB_OFFLINE = True
        return self

    def __exit__(self, *exc) -> None:
        import os

        if self._saved is not None:
            env, hf_constants, value = self._saved
            if env is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = env
            if hf_constants is not None:
                hf_constants.HF_HUB_OFFLINE = value


def not_cached(name: str, weights: str) -> "WeightsUnavailableError":
    return WeightsUnavailableError(f"backbone {name}: weights {weights!r} are not in the local cache and the hub is "
                                   f"unreachable; pass --weights /path/to/saved/model or --weights random")


TOKEN_CHOICES = ("block", "norm")
"""Which tokens :meth:`Backbone.encode` returns for a layer. ``"block"``: the transformer block's output, before the
model's final norm (what ``hidden_states[L]`` / ``forward_intermediates`` give). ``"norm"``: the same tokens passed
through the model's own final norm, as the model applies it to its last block (all tokens normalised, then the
prefix tokens dropped); for the last layer this is what users of the model take: HF ``last_hidden_state``
(DINOv2 ``layernorm``, DINOv3 ``norm``, SigLIP ``post_layernorm``) and open_clip's ``ln_post`` tokens
(``visual.output_tokens=True``, before ``proj``)."""


def check_token(token: str) -> str:
    if token not in TOKEN_CHOICES:
        raise TokenChoiceError(f"token={token!r}: use one of {', '.join(TOKEN_CHOICES)}")
    return token


def resolve_layers(layers: Sequence[int] | None, num_layers: int, name: str = "backbone") -> list[int]:
    """Block indices 1..num_layers; negative counts from the end (-1 = last block); None = last block."""
    out = []
    for layer in layers or [-1]:
        idx = layer + num_layers + 1 if layer < 0 else layer
        if not 1 <= idx <= num_layers:
            raise ValueError(f"layer {layer} out of range for {name} (blocks 1..{num_layers}, or -1 for the last)")
        out.append(idx)
    return out


@dataclass(frozen=True)
class PreprocessSpec:
    """What the CPU side must do to an image before ``encode``: resize to a square of ``image_size``."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str = "bicubic"  # PIL resampling filter name used for the resize


@dataclass(frozen=True)
class BackboneConfig:
    """A registry entry: everything known about a backbone without building it."""

    name: str  # registry name, e.g. "dinov3-vitl16", "tiny-dinov3"
    family: str  # "dinov2" | "dinov3" | "siglip" | "openclip" | ...
    source: str  # hub id, open_clip model name, or "" for locally built random-init variants
    image_size: int
    patch_size: int
    dim: int
    num_layers: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_prefix_tokens: int = 0  # CLS + register tokens dropped before the patch grid
    untrained: bool = False  # True for the tiny random-init variants used by tests
    description: str = ""
    resample: str = "bicubic"  # the resize filter the model's own preprocessing uses (PIL name)
    options: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size // self.patch_size, self.image_size // self.patch_size

    @property
    def preprocess(self) -> PreprocessSpec:
        return PreprocessSpec(self.image_size, self.mean, self.std, self.resample)


class Backbone(ABC):
    """A frozen encoder: eval mode, no grad, bf16 autocast on CUDA."""

    config: BackboneConfig
    device: torch.device
    has_final_norm: bool = False  # True where _forward_layers supports token="norm"

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def spec(self) -> PreprocessSpec:
        return self.config.preprocess

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.grid

    @property
    def dim(self) -> int:
        return self.config.dim

    def resolve_layers(self, layers: Sequence[int] | None) -> list[int]:
        return resolve_layers(layers, self.config.num_layers, self.name)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] (any device) -> float [B, 3, H, W] on the model device, normalised."""
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        stats = getattr(self, "_norm_stats", None)
        if stats is None or stats[0].device != x.device:  # built once per device, not per batch
            mean = torch.tensor(self.config.mean, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(self.config.std, device=x.device).view(1, 3, 1, 1)
            stats = self._norm_stats = (mean, std)
        return (x - stats[0]) / stats[1]

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, layers: Sequence[int] | None = None,
               token: str = "block") -> dict[int, torch.Tensor]:
        """uint8 [B, H, W, 3] at ``spec.image_size`` -> {layer: float32 tokens [B, Hp, Wp, d]} on the model device.

        Layer L is the output of transformer block L (1-based). ``token`` (:data:`TOKEN_CHOICES`): ``"block"`` =
        that output as it is, before the model's final norm; ``"norm"`` = after the model's own final norm (for
        the last layer: the model's ``last_hidden_state`` / open_clip's ``ln_post`` tokens). A family without a
        final norm raises :class:`NoFinalNormError` for ``"norm"``.
        """
        check_token(token)
        if token == "norm" and not self.has_final_norm:
            raise NoFinalNormError(f"backbone {self.name!r} (family {self.config.family}) has no final norm: "
                                   f"--token norm is undefined for it, use --token block")
        resolved = self.resolve_layers(layers)
        x = self.normalise(pixels)
        use_bf16 = self.device.type == "cuda"
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            # "block" keeps the two-argument call, so subclasses written before ``token`` existed still work
            grids = self._forward_layers(x, resolved) if token == "block" else self._forward_layers(x, resolved, token)
        return {layer: grids[layer].float() for layer in resolved}

    def save(self, path: str) -> str:
        """Write a checkpoint that ``create_backbone(self.name, weights=<returned path>)`` loads exactly."""
        raise NotImplementedError(f"{type(self).__name__} cannot save checkpoints")

    @abstractmethod
    def _forward_layers(self, x: torch.Tensor, layers: list[int], token: str = "block") -> dict[int, torch.Tensor]:
        """Normalised float [B, 3, H, W] -> {layer: [B, Hp, Wp, d]} with prefix tokens dropped; ``token="norm"``
        (only called when ``has_final_norm``) applies the model's final norm to all tokens before the drop."""
