"""Tiny random-init backbones: the same code paths as the real families, small enough for CPU tests.

They exist so that tests, the demo and CI exercise the real loaders (transformers' model classes and
``open_clip.create_model``) without any download. Their weights are random but *deterministic*: every build
seeds its own forked RNG, so two builds in any process give identical tokens and the caller's RNG is untouched.
Their tokens carry no meaning; every entry says so (``untrained=True`` and its description).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from .base import BackboneConfig

TINY_SEED = 0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.constants.OPENAI_DATASET_MEAN
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)  # open_clip.constants.OPENAI_DATASET_STD
HALF = (0.5, 0.5, 0.5)
TINY_OPENCLIP_MODEL = "spg-tiny-vit-16"  # name under which the tiny config is added to open_clip's config table

_UNTRAINED = "UNTRAINED random-init test model (seeded, deterministic); its tokens mean nothing."


@contextmanager
def seeded(seed: int = TINY_SEED) -> Iterator[None]:
    """Run a model constructor under a fixed CPU seed without disturbing the caller's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _tiny(name: str, family: str, source: str, patch: int, prefix: int, mean, std, arch: dict, **extra) -> BackboneConfig:
    return BackboneConfig(
        name=name, family=family, source=source, image_size=224, patch_size=patch, dim=64, num_layers=3,
        mean=mean, std=std, num_prefix_tokens=prefix, untrained=True,
        description=f"{family}-architecture, 3 blocks × 64 dims. {_UNTRAINED}",
        options={"arch": arch, "seed": TINY_SEED, **extra},
    )


TINY_OPENCLIP_CFG: dict = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 3, "width": 64, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}

TINY_CONFIGS: list[BackboneConfig] = [
    _tiny("tiny-dinov2", "dinov2", "", 14, 1, IMAGENET_MEAN, IMAGENET_STD,
          {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "mlp_ratio": 2,
           "image_size": 224, "patch_size": 14}),
    _tiny("tiny-dinov3", "dinov3", "", 16, 5, IMAGENET_MEAN, IMAGENET_STD,
          {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
           "patch_size": 16, "num_register_tokens": 4}),
    _tiny("tiny-siglip", "siglip", "", 16, 0, HALF, HALF,
          {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
           "image_size": 224, "patch_size": 16}),
    _tiny("tiny-openclip", "openclip", TINY_OPENCLIP_MODEL, 16, 1, OPENAI_MEAN, OPENAI_STD, {},
          openclip_cfg=TINY_OPENCLIP_CFG),
]
