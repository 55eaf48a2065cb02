"""The classical texture filter bank (``texture-filterbank``): registry entry, shapes, known answers, locality."""

from __future__ import annotations

import math

import pytest
import torch

from spg_dist.backbones import (
    WeightsMismatchError,
    check_weights,
    create_backbone,
    get_config,
    list_backbones,
)
from spg_dist.backbones.classical import (
    BASE_FEATURES,
    COLOUR_FEATURES,
    FEATURE_NAMES,
    MAPS,
    RECEPTIVE_RADIUS_PX,
    ClassicalTextureBackbone,
)

NAME = "texture-filterbank"
_BACKBONE: list = []


def backbone() -> ClassicalTextureBackbone:
    if not _BACKBONE:
        _BACKBONE.append(create_backbone(NAME))
    return _BACKBONE[0]


def encode(pixels: torch.Tensor) -> torch.Tensor:
    return backbone().encode(pixels)[1]


def col(name: str) -> int:
    return FEATURE_NAMES.index(name)


def cols(prefix: str = "", names=BASE_FEATURES) -> list[int]:
    return [col(prefix + n) for n in names]


def texture(n: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


def flat(value, size: int = 224) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.uint8).expand(1, size, size, 3).contiguous()


# ---------------------------------------------------------------- registry


def test_registry_entry():
    cfg = get_config(NAME)
    assert NAME in list_backbones()
    assert cfg.family == "classical" and not cfg.untrained and cfg.num_layers == 1
    assert (cfg.image_size, cfg.patch_size, cfg.grid) == (224, 16, (14, 14))
    assert cfg.mean == (0.0, 0.0, 0.0) and cfg.std == (1.0, 1.0, 1.0)  # normalise() only divides by 255
    assert len(BASE_FEATURES) == 8 + 3 * 7 * 3 == 71
    assert cfg.dim == len(FEATURE_NAMES) == 2 * len(BASE_FEATURES) == 142
    assert len(set(FEATURE_NAMES)) == cfg.dim
    for word in ("Gabor", "LoG", "gradient", "opponent", "3x3", "mean/std"):
        assert word in cfg.description


def test_encode_shape_dtype_layers_and_dim():
    out = backbone().encode(texture(3))
    assert list(out) == [1]
    assert out[1].shape == (3, 14, 14, get_config(NAME).dim) and out[1].dtype == torch.float32
    assert torch.isfinite(out[1]).all()
    assert list(backbone().encode(texture(1), layers=[-1])) == [1]
    with pytest.raises(ValueError, match="out of range"):
        backbone().encode(texture(1), layers=[2])


def test_weights_are_refused():
    check_weights(NAME)  # None: fine
    for bad in ("random", "/some/checkpoint"):
        with pytest.raises(WeightsMismatchError, match="no weights"):
            check_weights(NAME, bad)
        with pytest.raises(WeightsMismatchError, match="no weights"):
            create_backbone(NAME, weights=bad)


def test_image_size_override():
    big = create_backbone(NAME, image_size=256)
    assert big.grid == (16, 16) and big.spec.image_size == 256
    assert big.encode(texture(1, 256))[1].shape == (1, 16, 16, 142)
    assert create_backbone(NAME, image_size=32).encode(texture(1, 32))[1].shape == (1, 2, 2, 142)
    with pytest.raises(ValueError, match="multiple"):
        create_backbone(NAME, image_size=250)


def test_cli_lists_it():
    from click.testing import CliRunner

    from spg_dist.cli import main

    result = CliRunner().invoke(main, ["backbones"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith(NAME))
    assert "classical" in line and "grid 14x14" in line and "d=142" in line


# ---------------------------------------------------------------- behaviour


def test_deterministic_and_batch_independent():
    x = texture(4, seed=3)
    a = encode(x)
    assert torch.equal(a, create_backbone(NAME).encode(x)[1])
    assert torch.equal(a, encode(x))
    torch.testing.assert_close(encode(x[2:3])[0], a[2], rtol=1e-5, atol=1e-6)


def test_flat_grey_known_answer():
    out = encode(flat([128, 128, 128]))[0]
    v = 128 / 255
    texture_cols = [i for i, n in enumerate(FEATURE_NAMES) if n.removeprefix("nbr_") not in COLOUR_FEATURES]
    assert len(texture_cols) == 2 * 63
    torch.testing.assert_close(out[..., texture_cols], torch.zeros(14, 14, 126), rtol=0, atol=1e-5)
    for prefix in ("", "nbr_"):
        torch.testing.assert_close(out[..., cols(prefix, ["I_std", "O1_std", "O2_std"])], torch.zeros(14, 14, 3),
                                   rtol=0, atol=1e-6)
        for name, expected in [("I_mean", v), ("I_min", v), ("I_max", v), ("O1_mean", 0.0), ("O2_mean", 0.0)]:
            torch.testing.assert_close(out[..., col(prefix + name)], torch.full((14, 14), expected),
                                       rtol=0, atol=1e-6)


def test_pure_red_opponent_values():
    out = encode(flat([255, 0, 0]))[0]
    expected = {"I_mean": 1 / 3, "O1_mean": 1 / math.sqrt(2), "O2_mean": 1 / math.sqrt(6), "I_min": 1 / 3,
                "I_max": 1 / 3, "I_std": 0.0, "O1_std": 0.0, "O2_std": 0.0}
    for prefix in ("", "nbr_"):
        for name, value in expected.items():
            torch.testing.assert_close(out[..., col(prefix + name)], torch.full((14, 14), value), rtol=0, atol=1e-6)
    blue = encode(flat([0, 0, 255]))[0]
    torch.testing.assert_close(blue[..., col("O2_mean")], torch.full((14, 14), -2 / math.sqrt(6)), rtol=0, atol=1e-6)
    torch.testing.assert_close(blue[..., col("O1_mean")], torch.zeros(14, 14), rtol=0, atol=1e-6)


@pytest.mark.parametrize("period,scale", [(4, 1), (8, 2), (16, 4)])
def test_vertical_stripes_excite_the_matching_orientation(period, scale):
    x = torch.arange(224)
    row = torch.where((x % period) < period // 2, 200, 50).to(torch.uint8)  # intensity varies along x only
    img = row.view(1, 1, 224, 1).expand(1, 224, 224, 3).contiguous()
    out = encode(img)[0, 2:-2, 2:-2]  # away from the image border
    g0 = out[..., col(f"s{scale}_gabor0_mean")]
    g90 = out[..., col(f"s{scale}_gabor90_mean")]
    g45 = out[..., col(f"s{scale}_gabor45_mean")]
    assert g0.min() > 0.1 and (g0 > 10 * g90).all() and (g0 > g45).all()
    for other in {1, 2, 4} - {scale}:  # ... at the matching scale (wavelength 4s) most
        assert (g0 > out[..., col(f"s{other}_gabor0_mean")]).all()
    horizontal = encode(img.transpose(1, 2).contiguous())[0, 2:-2, 2:-2]  # same stripes turned by 90 degrees
    assert (horizontal[..., col(f"s{scale}_gabor90_mean")] > 10 * horizontal[..., col(f"s{scale}_gabor0_mean")]).all()


def test_planted_hole_is_local():
    clean = texture(1, seed=5)
    holed = clean.clone()
    holed[0, 102:106, 102:106] = 0  # a 4x4 black hole in the middle of patch (6, 6)
    a, b = encode(clean)[0], encode(holed)[0]
    changed = (a - b).abs() > 1e-5  # [14, 14, 142]
    rows, cols_ = torch.meshgrid(torch.arange(14), torch.arange(14), indexing="ij")
    dist = torch.maximum((rows - 6).abs(), (cols_ - 6).abs())  # Chebyshev distance in patches

    fine = [n for n in BASE_FEATURES if n in COLOUR_FEATURES or n.startswith("s1_")]
    assert changed[..., cols("", fine)].any(-1).nonzero().tolist() == [[6, 6]]  # colour + scale 1: the patch only
    fine_nbr = changed[..., cols("nbr_", fine)].any(-1)
    assert torch.equal(fine_nbr, dist <= 1)  # ... and their neighbourhood averages: exactly its 3x3 neighbours

    reach = 1 + RECEPTIVE_RADIUS_PX // 16  # coarse scales see further; bounded by the receptive field
    assert not changed[..., cols("", BASE_FEATURES)][dist > reach].any()
    assert not changed[dist > reach + 1].any()
    assert changed[dist > 1].any()  # the coarse scales do reach beyond the 3x3 neighbours
    delta = (a - b)[..., cols("", BASE_FEATURES)].norm(dim=-1)
    assert delta.argmax().item() == 6 * 14 + 6
    assert b[6, 6, col("I_min")] == 0 and b[6, 6, col("s1_log_max")] > a[6, 6, col("s1_log_max")]


def test_feature_names_follow_the_documented_order():
    assert FEATURE_NAMES[:8] == COLOUR_FEATURES
    assert FEATURE_NAMES[8:15] == tuple(f"s1_{m}_mean" for m in MAPS)
    assert FEATURE_NAMES[71] == "nbr_I_mean" and FEATURE_NAMES[-1] == "nbr_s4_cgrad_max"
