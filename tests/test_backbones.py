"""Backbone registry and loaders: shapes, layer semantics, determinism, strict loading, offline behaviour.

Only the tiny random-init entries are built from scratch (plus two real architectures with random weights);
nothing is downloaded: HF_HUB_OFFLINE is set before transformers is imported.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import load_file, save_file

from spg_dist.backbones import (
    UnknownBackboneError,
    WeightsMismatchError,
    WeightsUnavailableError,
    create_backbone,
    get_config,
    list_backbones,
    save_backbone,
)

TINY = ["tiny-dinov2", "tiny-dinov3", "tiny-siglip", "tiny-openclip"]
TINY_GEOMETRY = {"tiny-dinov2": (16, 1), "tiny-dinov3": (14, 5), "tiny-siglip": (14, 0), "tiny-openclip": (14, 1)}
_CACHE: dict = {}


def tiny(name: str):
    """One shared build per tiny family (read-only use); tests that mutate weights build their own."""
    if name not in _CACHE:
        _CACHE[name] = create_backbone(name)
    return _CACHE[name]


def images(n: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


def manual_layer(backbone, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer ``layer`` computed without the backbone's own forward: HF hidden_states / open_clip blocks by hand."""
    cfg = backbone.config
    hp = x.shape[1] // cfg.patch_size
    with torch.no_grad():
        pixels = backbone.normalise(x)
        if cfg.family == "openclip":
            h = backbone.visual._embeds(pixels)
            for block in backbone.visual.transformer.resblocks[:layer]:
                h = block(h)
        else:
            kwargs = backbone._forward_kwargs
            h = backbone.model(pixel_values=pixels, output_hidden_states=True, **kwargs).hidden_states[layer]
        assert h.shape[1] == cfg.num_prefix_tokens + hp * hp  # the prefix count is what the model really emits
        return h[:, cfg.num_prefix_tokens:].reshape(x.shape[0], hp, hp, -1)


# ---------------------------------------------------------------- registry, without building anything


def test_registry_lists_real_and_tiny_entries():
    names = list_backbones()
    for name in ["dinov2-vits14", "dinov2-vitb14", "dinov2-vitl14", "dinov2-reg-vitl14", "dinov3-vits16",
                 "dinov3-vitb16", "dinov3-vitl16", "siglip-l16-384", "openclip-vitl14-336", "openclip-vitb32", *TINY]:
        assert name in names
    for name in TINY:
        cfg = get_config(name)
        assert cfg.untrained and "UNTRAINED" in cfg.description
    assert not any(get_config(n).untrained for n in names if not n.startswith("tiny-"))


def test_unknown_name_lists_known_names_on_one_line():
    with pytest.raises(UnknownBackboneError) as err:
        get_config("dinov5-giant")
    text = str(err.value)
    assert "dinov5-giant" in text and "\n" not in text
    assert all(name in text for name in list_backbones())
    assert isinstance(err.value, KeyError)
    with pytest.raises(UnknownBackboneError):
        create_backbone("nope")


@pytest.mark.parametrize("name,grid,dim,layers,prefix", [
    ("dinov3-vitl16", 28, 1024, 24, 5), ("dinov3-vitb16", 28, 768, 12, 5), ("dinov3-vits16", 28, 384, 12, 5),
    ("dinov2-vitl14", 32, 1024, 24, 1), ("dinov2-vits14", 32, 384, 12, 1), ("dinov2-reg-vitl14", 32, 1024, 24, 5),
    ("siglip-l16-384", 24, 1024, 24, 0), ("openclip-vitl14-336", 37, 1024, 24, 1), ("openclip-vitb32", 7, 768, 12, 1),
])
def test_real_entry_geometry(name, grid, dim, layers, prefix):
    cfg = get_config(name)
    assert cfg.grid == (grid, grid) and cfg.dim == dim and cfg.num_layers == layers
    assert cfg.num_prefix_tokens == prefix
    if cfg.family != "openclip":  # the recorded transformers hyper-parameters agree with the entry
        arch = cfg.options["arch"]
        assert (arch["hidden_size"], arch["num_hidden_layers"], arch["patch_size"]) == (dim, layers, cfg.patch_size)
        assert arch.get("num_register_tokens", 0) == max(prefix - 1, 0)


def test_real_entries_agree_with_libraries():
    import open_clip
    from open_clip import constants

    for name in ["openclip-vitl14-336", "openclip-vitb32"]:
        cfg = get_config(name)
        vision = open_clip.get_model_config(cfg.source)["vision_cfg"]
        assert (vision["width"], vision["layers"], vision["patch_size"]) == (cfg.dim, cfg.num_layers, cfg.patch_size)
        assert cfg.mean == constants.OPENAI_DATASET_MEAN and cfg.std == constants.OPENAI_DATASET_STD
        assert "openai" in open_clip.list_pretrained_tags_by_model(cfg.source)
    assert get_config("dinov3-vitl16").mean == constants.IMAGENET_MEAN
    assert get_config("siglip-l16-384").mean == (0.5, 0.5, 0.5)
    spec = get_config("dinov3-vitl16").preprocess
    assert (spec.image_size, spec.resample) == (448, "bilinear")
    assert get_config("facebook/dinov3-vitl16-pretrain-lvd1689m").name == "dinov3-vitl16"  # hub id alias
    assert get_config("ViT-L-14-336").name == "openclip-vitl14-336"


@pytest.mark.parametrize("name", ["dinov3-vitl16", "siglip-l16-384", "openclip-vitl14-336"])
def test_real_entry_without_local_weights_fails_clearly_offline(name):
    with pytest.raises(WeightsUnavailableError, match="--weights"):
        create_backbone(name)


# ---------------------------------------------------------------- tiny families: encode


@pytest.mark.parametrize("name", TINY)
def test_encode_shapes_and_dtype(name):
    backbone = tiny(name)
    grid, _ = TINY_GEOMETRY[name]
    assert backbone.grid == (grid, grid) and backbone.spec.image_size == 224
    out = backbone.encode(images(3))
    assert list(out) == [3] and out[3].shape == (3, grid, grid, 64) and out[3].dtype == torch.float32
    out = backbone.encode(images(2), layers=[3, 1, -2])
    assert list(out) == [3, 1, 2]
    assert all(t.shape == (2, grid, grid, 64) for t in out.values())
    assert not torch.equal(out[1], out[3])
    module = backbone.model if hasattr(backbone, "model") else backbone.clip
    assert not module.training and not any(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("name", TINY)
def test_layers_match_manual_forward_with_prefix_dropped(name):
    backbone = tiny(name)
    x = images(2)
    out = backbone.encode(x, layers=[3, 1, 2])  # unsorted on purpose: open_clip returns block order
    for layer in (1, 2, 3):
        torch.testing.assert_close(out[layer], manual_layer(backbone, x, layer), rtol=1e-5, atol=1e-5)
    assert TINY_GEOMETRY[name][1] == backbone.config.num_prefix_tokens


@pytest.mark.parametrize("name", TINY)
def test_layer_out_of_range(name):
    backbone = tiny(name)
    for bad in (0, 4, -4):
        with pytest.raises(ValueError, match="out of range"):
            backbone.encode(images(1), layers=[bad])


def test_two_builds_are_identical_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b = create_backbone("tiny-dinov3"), create_backbone("tiny-dinov3")
    assert torch.equal(torch.rand(3), expected)
    x = images(2)
    assert torch.equal(a.encode(x)[3], b.encode(x)[3])
    for name in ["tiny-dinov2", "tiny-siglip", "tiny-openclip"]:
        assert torch.equal(create_backbone(name).encode(x, [2])[2], tiny(name).encode(x, [2])[2])


def test_image_size_override():
    backbone = create_backbone("tiny-siglip", image_size=256)  # SigLIP needs interpolate_pos_encoding here
    assert backbone.encode(images(1, 256))[3].shape == (1, 16, 16, 64)
    assert create_backbone("tiny-dinov2", image_size=280).encode(images(1, 280))[3].shape == (1, 20, 20, 64)
    with pytest.raises(ValueError, match="multiple"):
        create_backbone("tiny-dinov3", image_size=250)


# ---------------------------------------------------------------- loading: round trip and strictness


@pytest.mark.parametrize("name", TINY)
def test_save_load_round_trip(name, tmp_path):
    backbone = create_backbone(name)
    params = backbone.model if hasattr(backbone, "model") else backbone.clip
    with torch.no_grad():  # move the weights away from the seeded init, so only a real load can reproduce them
        for p in params.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = images(2)
    path = save_backbone(backbone, str(tmp_path / "ckpt"))
    loaded = create_backbone(name, weights=path)
    for layer in (1, 3):
        assert torch.equal(loaded.encode(x, [layer])[layer], backbone.encode(x, [layer])[layer])
    assert not torch.equal(loaded.encode(x)[3], tiny(name).encode(x)[3])
    assert loaded.name == name


def test_hf_checkpoint_of_another_family_is_rejected(tmp_path):
    path = save_backbone(tiny("tiny-dinov2"), str(tmp_path / "d2"))
    with pytest.raises(WeightsMismatchError, match="dinov2"):
        create_backbone("tiny-dinov3", weights=path)
    with pytest.raises(WeightsMismatchError):
        create_backbone("tiny-openclip", weights=path)  # an HF directory holds no open_clip checkpoint


def test_hf_checkpoint_with_other_architecture_is_rejected(tmp_path):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    arch = dict(get_config("tiny-dinov3").options["arch"], hidden_size=96)
    DINOv3ViTModel(DINOv3ViTConfig(**arch)).save_pretrained(tmp_path / "wide")
    with pytest.raises(WeightsMismatchError, match="hidden_size"):
        create_backbone("tiny-dinov3", weights=str(tmp_path / "wide"))


def test_hf_checkpoint_with_missing_tensor_is_rejected(tmp_path):
    path = save_backbone(tiny("tiny-dinov3"), str(tmp_path / "d3"))
    state = load_file(os.path.join(path, "model.safetensors"))
    dropped = next(k for k in state if "layer.2." in k)
    del state[dropped]
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsMismatchError, match="missing"):
        create_backbone("tiny-dinov3", weights=path)


def test_full_siglip_checkpoint_loads_its_vision_tower(tmp_path):
    """Hub SigLIP checkpoints are image+text models (model_type 'siglip'): the text tower must be ignored."""
    from transformers import SiglipConfig, SiglipModel

    backbone = tiny("tiny-siglip")
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    full = SiglipModel(SiglipConfig(vision_config=get_config("tiny-siglip").options["arch"], text_config=text))
    full.vision_model.load_state_dict(backbone.model.state_dict())
    full.save_pretrained(tmp_path / "full")
    loaded = create_backbone("tiny-siglip", weights=str(tmp_path / "full"))
    x = images(1)
    assert torch.equal(loaded.encode(x)[3], backbone.encode(x)[3])


def test_openclip_checkpoint_with_other_width_is_rejected(tmp_path):
    import copy

    import open_clip

    cfg = copy.deepcopy(get_config("tiny-openclip").options["openclip_cfg"])
    cfg["vision_cfg"]["width"] = 32
    other = open_clip.model.CLIP(**cfg)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "w32.safetensors"))
    with pytest.raises(WeightsMismatchError, match="do not fit"):
        create_backbone("tiny-openclip", weights=str(tmp_path / "w32.safetensors"))
    with pytest.raises(WeightsMismatchError):  # an open_clip file is not a transformers directory
        create_backbone("tiny-dinov2", weights=str(tmp_path / "w32.safetensors"))


def test_openclip_checkpoint_of_a_sibling_resolution_is_rejected(tmp_path):
    """open_clip would silently interpolate the position grid; a grid that is neither native nor ours is refused."""
    import copy

    import open_clip

    cfg = copy.deepcopy(get_config("tiny-openclip").options["openclip_cfg"])
    cfg["vision_cfg"]["image_size"] = 160  # 10x10 grid instead of 14x14
    other = open_clip.model.CLIP(**cfg)
    torch.save(other.state_dict(), tmp_path / "g10.pt")
    with pytest.raises(WeightsMismatchError, match="10x10"):
        create_backbone("tiny-openclip", weights=str(tmp_path / "g10.pt"))


def test_openclip_runs_at_a_forced_size_from_a_native_checkpoint(tmp_path):
    """A checkpoint at the native grid loads into a model run larger (as ViT-L/14@336 at 518 px): grid resized."""
    path = save_backbone(tiny("tiny-openclip"), str(tmp_path / "native.safetensors"))
    big = create_backbone("tiny-openclip", weights=path, image_size=320)
    assert big.encode(images(1, 320))[3].shape == (1, 20, 20, 64)
    assert big.visual.positional_embedding.shape[0] == 20 * 20 + 1


@pytest.mark.parametrize("name", ["tiny-dinov3", "tiny-openclip", "dinov3-vitl16"])
def test_missing_local_path_is_named(name, tmp_path):
    missing = str(tmp_path / "no" / "such" / "checkpoint")
    with pytest.raises(WeightsUnavailableError, match="no/such/checkpoint"):
        create_backbone(name, weights=missing)


# ---------------------------------------------------------------- real architectures with random weights


@pytest.mark.parametrize("name,size,grid,dim", [("dinov2-vits14", 224, 16, 384), ("dinov3-vits16", 224, 14, 384),
                                                ("openclip-vitb32", 224, 7, 768)])
def test_real_architecture_with_random_weights(name, size, grid, dim):
    backbone = create_backbone(name, weights="random", image_size=size)
    assert backbone.name == f"{name}@random" and backbone.config.untrained
    assert "RANDOM INIT" in backbone.config.description
    out = backbone.encode(images(1, size), layers=[1, -1])
    assert out[backbone.config.num_layers].shape == (1, grid, grid, dim)
    assert get_config(backbone.name).untrained  # the reported name resolves to the same random variant
