"""VisualAD: learnable tokens inside a frozen ViT (tiny random-init backbones, small images, CPU, no downloads).

What is pinned down: with one-way attention (``isolate=True``) the patch tokens are exactly the backbone's own and
the two tokens' path equals a brute-force run of each block on the full sequence under an explicit attention
mask; joint attention changes the patch tokens; the margin term by hand; a short fit lowers the loss; maps on the
ViT's grid; state round trip reproduces scores exactly; settings are validated.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from spg_dist.backbones import create_backbone
from spg_dist.detectors import DetectorConfigError, FitData, TokenSet, create_detector
from spg_dist.detectors.visualad import (AlignMLP, TokenViT, VisualADDetector, default_layers,
                                         insert_tokens_forward, margin_loss)

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two threads spin-wait on
    each other (seconds per step); restored afterwards for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SIZES = {"tiny-openclip": 64, "tiny-dinov2": 56, "tiny-dinov3": 64, "tiny-siglip": 64}
_BACKBONES: dict = {}


def backbone(name: str):
    if name not in _BACKBONES:
        _BACKBONES[name] = create_backbone(name, image_size=SIZES[name])
    return _BACKBONES[name]


def pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


def tokens(dim: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, dim, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ the opened-up forward
@pytest.mark.parametrize("name", ["tiny-openclip", "tiny-dinov2", "tiny-dinov3", "tiny-siglip"])
def test_isolated_patch_tokens_are_the_backbones_own(name):
    bb = backbone(name)
    x = pixels(2, SIZES[name])
    t = tokens(bb.config.dim)
    norm = TokenViT(bb).final_norm
    own = bb.encode(x, [1, 2, 3])  # block outputs before the final norm
    with torch.no_grad():
        iso, z_iso = insert_tokens_forward(bb, x, t, [1, 2, 3], isolate=True)
        joint, z_joint = insert_tokens_forward(bb, x, t, [1, 2, 3], isolate=False)
        for layer in (1, 2, 3):
            ref = norm(own[layer].reshape(2, -1, bb.config.dim))
            assert iso[layer].shape == ref.shape == (2, bb.grid[0] * bb.grid[1], bb.config.dim)
            torch.testing.assert_close(iso[layer], ref, atol=1e-5, rtol=0)
            assert (joint[layer] - ref).abs().max() > 1e-4  # joint attention: the patches see the tokens
        assert z_iso.shape == z_joint.shape == (2, 2, bb.config.dim)
        # the residual alignment MLP is the identity at init, so the aligned patches are the backbone's too
        align = AlignMLP(bb.config.dim, residual=True).eval()
        torch.testing.assert_close(align(iso[3]), iso[3], atol=0, rtol=0)
        assert not torch.allclose(AlignMLP(bb.config.dim, residual=False).eval()(iso[3]), iso[3])


def _masked_block(vit: TokenViT, i: int, seq: torch.Tensor, ctx, n_extra: int) -> torch.Tensor:
    """Block ``i`` on the full sequence [extra, original] with an explicit mask: original rows never see the
    extra columns (the brute-force definition of one-way attention)."""
    length = seq.shape[1]
    mask = torch.zeros(length, length)
    mask[n_extra:, :n_extra] = float("-inf")
    block = vit.blocks[i]
    if vit.family == "openclip":
        return block(seq, attn_mask=mask)
    mask4 = mask[None, None]
    if vit.family == "dinov3":
        return block(seq, attention_mask=mask4, position_embeddings=ctx)
    return block(seq, attention_mask=mask4)


@pytest.mark.parametrize("name", ["tiny-openclip", "tiny-dinov3", "tiny-dinov2"])
def test_token_path_equals_masked_full_sequence(name):
    bb = backbone(name)
    vit = TokenViT(bb)
    x = pixels(2, SIZES[name], seed=3)
    t = tokens(bb.config.dim, seed=4)
    with torch.no_grad():
        patches, z = insert_tokens_forward(bb, x, t, [1, 2, 3], isolate=True)
        h, ctx = vit.embed(bb.normalise(x))
        seq = torch.cat([vit.token_init(t).unsqueeze(0).expand(2, -1, -1), h], dim=1)
        start = 2 + vit.num_prefix
        for i in range(vit.num_layers):
            seq = _masked_block(vit, i, seq, ctx, 2)
            torch.testing.assert_close(vit.final_norm(seq[:, start:]), patches[i + 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(vit.final_norm(seq[:, :2]), z, atol=1e-5, rtol=0)


def test_token_path_carries_gradient_only_into_the_tokens():
    bb = backbone("tiny-openclip")
    t = tokens(bb.config.dim).requires_grad_(True)
    patches, z = insert_tokens_forward(bb, pixels(1, 64), t, [3], isolate=True)
    assert not patches[3].requires_grad
    (z * torch.randn(z.shape, generator=torch.Generator().manual_seed(0))).sum().backward()  # sum(LN(.)) is flat
    assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.visual.parameters())


# ------------------------------------------------------------------ losses, layers, smoothing
def test_margin_loss_by_hand():
    def at(deg: float) -> torch.Tensor:
        r = np.deg2rad(deg)
        return torch.tensor([[np.cos(r), np.sin(r), 0.0]], dtype=torch.float32)

    e = at(0.0) * 3.0  # length does not matter
    assert margin_loss(e, at(130.0)).item() == 0.0
    assert margin_loss(e, at(180.0)).item() == 0.0
    assert margin_loss(e, at(90.0)).item() == pytest.approx(0.5, abs=1e-6)
    assert margin_loss(e, at(60.0)).item() == pytest.approx(1.0, abs=1e-6)
    assert margin_loss(e, at(110.0)).item() == pytest.approx(np.cos(np.deg2rad(110)) + 0.5, abs=1e-6)
    both = margin_loss(torch.cat([e, e]), torch.cat([at(130.0), at(90.0)]))  # batch mean
    assert both.item() == pytest.approx(0.25, abs=1e-6)


def test_default_layers():
    assert default_layers(24) == [6, 12, 18, 24]
    assert default_layers(12) == [3, 6, 9, 12]
    assert default_layers(3) == [1, 2, 3]
    assert VisualADDetector(backbone="tiny-dinov3").layers == [1, 2, 3]
    assert VisualADDetector(backbone="tiny-dinov3", layers="-1,1").layers == [1, 3]


def test_postprocess_scales_sigma_with_resolution():
    det = VisualADDetector()
    for size, sigma in ((518, 4.0), (259, 2.0)):
        maps = np.zeros((2, size, size), np.float32)
        maps[:, size // 2, size // 3] = 1.0
        out = det.postprocess_maps(maps)
        assert out.dtype == np.float32 and out.shape == maps.shape
        np.testing.assert_allclose(out[0], gaussian_filter(maps[0], sigma), atol=1e-7)
    assert np.array_equal(VisualADDetector(smooth_sigma=0).postprocess_maps(maps), maps)


# ------------------------------------------------------------------ the detector
@pytest.fixture(scope="module")
def aux_set(tmp_path_factory):
    """8 images at 64 px: noisy grey, every second one with a red square (its mask at 32 px)."""
    root = tmp_path_factory.mktemp("visualad_aux")
    rng = np.random.default_rng(0)
    uris, masks, labels = [], [], []
    for i in range(8):
        img = rng.normal(120, 12, (64, 64, 3)).clip(0, 255).astype(np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        if i % 2:
            y, x = rng.integers(4, 20, 2)
            img[2 * y:2 * y + 20, 2 * x:2 * x + 20] = (235, 30, 30)
            mask[y:y + 10, x:x + 10] = 1
        path = root / f"img_{i}.png"
        Image.fromarray(img).save(path)
        uris.append(str(path))
        masks.append(mask)
        labels.append(i % 2)
    return TokenSet({}, [f"img_{i}" for i in range(8)], ["synth"] * 8, np.array(labels), np.stack(masks), uris)


FIT = dict(image_size=64, epochs=2, batch_images=4, lr_tokens=1e-2, lr_modules=1e-3)


@pytest.mark.parametrize("isolate", [True, False])
def test_fit_lowers_loss_scores_on_the_grid_and_state_round_trips(aux_set, isolate):
    det = create_detector("visualad", isolate=isolate, **FIT)
    assert isinstance(det, VisualADDetector) and det.trainable
    assert det.inputs().aux and det.inputs().images and det.inputs().layers == () and det.inputs().scope == "dataset"
    assert det.pool_on == "map"
    with pytest.raises(RuntimeError):
        det.score(aux_set)
    det.build()
    before = det.evaluate_loss(aux_set)
    det.fit(FitData(aux=aux_set))
    after = det.evaluate_loss(aux_set)
    assert after["loss"] < before["loss"]
    assert len(det.curve) == 2 * 2 and all(np.isfinite(r["loss"]) for r in det.curve)

    maps = det.score(aux_set)
    assert maps.shape == (8, 4, 4) and maps.dtype == np.float32 and np.isfinite(maps).all()
    assert det.image_scores(det.postprocess_maps(maps)).shape == (8,)

    state = det.state_dict()
    assert {"t_a", "t_n", "norm.weight", "norm.bias"} <= set(state)
    assert any(k.startswith("align.") for k in state) and any(k.startswith("sca.") for k in state)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    fresh = create_detector("visualad", isolate=isolate, **FIT)
    fresh.load_state_dict(state)
    assert np.array_equal(fresh.score(aux_set), maps)

    params = det.params()
    assert params["note"] == "runs its own ViT (tiny-openclip), not the stored tokens"
    assert params["backbone_ran"] == "tiny-openclip" and params["layers_used"] == [1, 2, 3]
    assert set(params["deviations"]) >= {"isolate", "residual_align"}


def test_fit_is_deterministic_and_runs_on_dinov3(aux_set):
    settings = dict(backbone="tiny-dinov3", image_size=64, epochs=1, batch_images=8)
    a = create_detector("visualad", **settings).fit(FitData(aux=aux_set))
    b = create_detector("visualad", **settings).fit(FitData(aux=aux_set))
    assert [r["loss"] for r in a.curve] == [r["loss"] for r in b.curve]
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.score(aux_set).shape == (8, 4, 4)


def test_state_of_other_settings_is_refused(aux_set):
    det = create_detector("visualad", image_size=64)
    det.build()
    other = create_detector("visualad", image_size=64, anchors=2)
    with pytest.raises(DetectorConfigError):
        other.load_state_dict(det.state_dict())


@pytest.mark.parametrize("params", [
    {"backbone": "no-such-vit"},
    {"backbone": "texture-filterbank"},  # a classical filter bank: no ViT to put tokens in
    {"image_size": 70},  # not a multiple of 16
    {"image_size": -16},
    {"layers": "4"},
    {"layers": "3,-1"},
    {"anchors": 0},
    {"epochs": -1},
    {"batch_images": 0},
    {"lr_tokens": 0},
    {"margin": 1.5},
    {"smooth_sigma": -1},
    {"pooling": "top:0%"},
    {"isolate": "maybe"},
    {"temperature": 0.1},
])
def test_settings_are_validated(params):
    with pytest.raises(DetectorConfigError) as err:
        create_detector("visualad", **params)
    assert "\n" not in str(err.value)
