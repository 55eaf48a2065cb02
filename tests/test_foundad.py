"""FoundAD: CutPaste corruptions, the manifold projector (reference structure), its training on synthetic tokens
with a known answer, the detector's settings and state, and DDP training on Ray Train (two workers)."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from spg_dist.data.corruptions import CORRUPTION_KINDS, CorruptionWarning, corruption_seed, cutpaste
from spg_dist.detectors.base import DetectorConfigError, FitData, TokenSet
from spg_dist.detectors.foundad import (FoundADDetector, ManifoldProjector, identity_coin, projection_error,
                                        train_projector)

D, R, GRID = 16, 4, 4  # token dimension, rank of the clean subspace, token grid
TINY = dict(width=32, heads=4, depth=2, batch_images=8)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: intra-op threads only contend with each other on a 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(labels).ravel(), np.asarray(scores).ravel()))


# ------------------------------------------------------------------------------------------------- CutPaste
def _image(size: int, seed: int = 0) -> np.ndarray:
    """Texture plus a smooth gradient: every patch differs from every other place of the image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx * 255 // max(size - 1, 1), yy * 255 // max(size - 1, 1), (xx + yy) * 127 // size], -1)
    return np.clip(base + rng.integers(-20, 21, (size, size, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", CORRUPTION_KINDS)
@pytest.mark.parametrize("size", [16, 64, 256])
def test_cutpaste_changes_only_the_masked_region(kind: str, size: int) -> None:
    img = _image(size)
    before = img.copy()
    for seed in range(12):
        out, mask = cutpaste(img, np.random.default_rng(seed), kind)
        assert out.dtype == np.uint8 and out.shape == img.shape
        assert mask.dtype == np.uint8 and mask.shape == img.shape[:2] and set(np.unique(mask)) <= {0, 1}
        assert mask.any(), "empty mask"
        assert np.array_equal(out[mask == 0], img[mask == 0]), "a pixel outside the mask changed"
        assert not np.array_equal(out, img), "unchanged image"
    assert np.array_equal(img, before), "the input was modified in place"


def test_cutpaste_shapes_of_normal_and_scar_masks() -> None:
    img = _image(256)
    rectangles, rotated = 0, 0
    for seed in range(10):
        _, m = cutpaste(img, np.random.default_rng(seed), "normal")
        ys, xs = np.nonzero(m)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        rectangles += int(box == m.sum())
        assert 0.015 * 256 ** 2 <= m.sum() <= 0.26 * 256 ** 2 + 256  # 2-25 % of the area (rounding)
        _, m = cutpaste(img, np.random.default_rng(seed), "scar")
        ys, xs = np.nonzero(m)
        rotated += int((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1) > m.sum())  # no box corners pasted
        assert m.sum() <= 16 * 25
    assert rectangles == 10 and rotated >= 8


def test_cutpaste_is_deterministic_given_the_seed() -> None:
    img = _image(64)
    a = cutpaste(img, np.random.default_rng(corruption_seed("cat/000.png", 0)))
    b = cutpaste(img, np.random.default_rng(corruption_seed("cat/000.png", 0)))
    c = cutpaste(img, np.random.default_rng(corruption_seed("cat/000.png", 1)))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not (np.array_equal(a[0], c[0]) and np.array_equal(a[1], c[1]))
    outs = {cutpaste(img, np.random.default_rng(s))[0].tobytes() for s in range(8)}
    assert len(outs) == 8


def test_corruption_seed_is_stable() -> None:
    # CRC-32, not Python's salted hash(): the same in every process and on every machine
    assert corruption_seed("a/b.png", 0) == 3852617167
    assert corruption_seed("a/b.png", 0) != corruption_seed("a/b.png", 1) != corruption_seed("a/c.png", 1)
    assert all(0 <= corruption_seed(f"x{i}", i) < 2 ** 32 for i in range(10))


def test_cutpaste_refuses_bad_input_and_warns_on_a_flat_image() -> None:
    with pytest.raises(ValueError, match="kind"):
        cutpaste(_image(16), np.random.default_rng(0), "blur")
    with pytest.raises(ValueError, match="uint8"):
        cutpaste(np.zeros((16, 16), np.uint8), np.random.default_rng(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, mask = cutpaste(np.zeros((16, 16, 3), np.uint8), np.random.default_rng(0))  # black: nothing to jitter
    assert any(issubclass(w.category, CorruptionWarning) for w in caught)
    assert mask.any()


# ------------------------------------------------------------------------------------------------- the projector
def test_projector_has_the_reference_structure() -> None:
    torch.manual_seed(0)
    p = ManifoldProjector(D, width=32, depth=2, heads=4, mlp_ratio=4.0, input_dropout=0.2)
    shapes = {k: tuple(v.shape) for k, v in p.state_dict().items()}
    assert shapes["predictor_embed.weight"] == (32, D) and shapes["predictor_proj.weight"] == (D, 32)
    block = "predictor_blocks.1."
    assert shapes[block + "attn.qkv.weight"] == (96, 32) and shapes[block + "attn.qkv.bias"] == (96,)
    assert shapes[block + "attn.proj.weight"] == (32, 32)
    assert shapes[block + "mlp.fc1.weight"] == (128, 32) and shapes[block + "mlp.fc2.weight"] == (32, 128)
    assert shapes["predictor_norm.weight"] == (32,)
    assert len(p.predictor_blocks) == 2 and not any("pos" in k for k in shapes)  # no positional embedding
    assert all(m.eps == 1e-6 for m in p.modules() if isinstance(m, torch.nn.LayerNorm))
    for name, m in p.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert torch.all(m.bias == 0) and abs(m.weight.std().item() - 0.02) < 0.006, name
        if isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)

    # forward = embed -> (block + the embedding, after every block) -> LN -> proj; dropout only in training
    with torch.no_grad():
        for prm in p.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    f = torch.randn(3, GRID, GRID, D)
    p.eval()
    with torch.no_grad():
        x = p.predictor_embed(f.reshape(3, -1, D))
        res, plain = x.clone(), x.clone()
        for blk in p.predictor_blocks:
            x, plain = blk(x) + res, blk(plain)
        want = p.predictor_proj(p.predictor_norm(x)).reshape(f.shape)
        without_residual = p.predictor_proj(p.predictor_norm(plain)).reshape(f.shape)
        assert torch.allclose(p(f), want, atol=1e-6) and not torch.allclose(want, without_residual, atol=1e-3)
        assert torch.equal(p(f), p(f))
        p.train()
        assert not torch.equal(p(f), p(f))


def test_heads_must_divide_width() -> None:
    with pytest.raises(ValueError):
        ManifoldProjector(D, width=30, heads=4)


# ------------------------------------------------------------------------------------------------- synthetic data
def synthetic(n: int, copies: int, seed: int, noise: float = 1.0):
    """Clean tokens in a rank-R subspace of R^D; a corrupted copy adds off-subspace noise on ~25 % of the patches
    (the planted ones). Returns (clean [n*copies, h, w, D], corrupted, planted mask [n*copies, h, w], ids)."""
    basis = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(1234)))[0]
    inside, outside = basis[:, :R], basis[:, R:]
    g = torch.Generator().manual_seed(seed)
    clean = (torch.randn(n, GRID, GRID, R, generator=g) @ inside.T).repeat_interleave(copies, 0)
    planted = torch.rand(clean.shape[:3], generator=g) < 0.25
    planted[:, 0, 0] = True  # every copy has at least one planted patch
    off = torch.randn(*clean.shape[:3], D - R, generator=g) @ outside.T
    corrupted = clean + noise * off * planted[..., None]
    ids = [f"s{seed}/img{i // copies:03d}" for i in range(n * copies)]
    return clean, corrupted, planted, ids


def fit_data(clean: torch.Tensor, corrupted: torch.Tensor, ids: list[str], order: np.ndarray | None = None) -> FitData:
    """FitData as the evaluation loop builds it: fp16 tokens, one clean row per shot, corrupted rows naming
    their clean shot by id (in any order)."""
    shot_ids = list(dict.fromkeys(ids))
    first = [ids.index(s) for s in shot_ids]
    shots = TokenSet({7: clean[first].numpy().astype(np.float16)}, shot_ids, ["c"] * len(shot_ids),
                     np.zeros(len(shot_ids), np.int64))
    order = np.arange(len(ids)) if order is None else order
    corr = TokenSet({7: corrupted[order].numpy().astype(np.float16)}, [f"{ids[i]}#cp{i}" for i in order],
                    ["c"] * len(order), np.ones(len(order), np.int64), source_ids=[ids[i] for i in order],
                    clean=shots)
    return FitData(shots=shots, corrupted=corr)


def test_pairs_follow_the_source_ids() -> None:
    clean, corrupted, _, ids = synthetic(4, 2, seed=3)
    order = np.random.default_rng(0).permutation(len(ids))
    c, x = FoundADDetector.pairs(fit_data(clean, corrupted, ids, order).corrupted)
    assert np.array_equal(c, clean[order].numpy().astype(np.float16))
    assert np.array_equal(x, corrupted[order].numpy().astype(np.float16))
    bad = fit_data(clean, corrupted, ids).corrupted
    bad.source_ids = ["nope"] + bad.source_ids[1:]
    with pytest.raises(DetectorConfigError, match="not among the clean shots"):
        FoundADDetector.pairs(bad)


# ------------------------------------------------------------------------------------------------- training
def test_training_is_seeded_and_leaves_the_global_rng_alone() -> None:
    clean, corrupted, _, _ = synthetic(4, 2, seed=5)
    s = FoundADDetector.Settings(**TINY, steps=5)
    torch.manual_seed(99)
    state = torch.get_rng_state()
    a, curve_a = train_projector(clean, corrupted, s)
    assert torch.equal(torch.get_rng_state(), state)
    b, curve_b = train_projector(clean, corrupted, s)
    assert curve_a == curve_b and len(curve_a) == 5
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert [p["identity"] for p in curve_a] == [identity_coin(0, i, 0.5) for i in range(5)]
    assert not a.training


def test_zero_steps_state_round_trip_gives_identical_scores() -> None:
    from spg_dist.sae.serialization import pack, unpack

    clean, corrupted, _, ids = synthetic(4, 2, seed=7)
    det = FoundADDetector(FoundADDetector.Settings(**TINY, steps=0)).fit(fit_data(clean, corrupted, ids))
    batch = TokenSet({7: corrupted[:3].numpy().astype(np.float16)}, ["a", "b", "c"], ["c"] * 3, np.ones(3))
    scores = det.score(batch)
    assert scores.dtype == np.float32 and scores.shape == (3, GRID, GRID)
    tensors, _ = unpack(pack(det.state_dict(), {"detector": det.name}))  # the way it is stored: safetensors
    again = FoundADDetector(FoundADDetector.Settings(**TINY, steps=0))
    again.load_state_dict(tensors)
    assert np.array_equal(again.score(batch), scores)
    assert int(tensors["arch.d"]) == D
    with pytest.raises(DetectorConfigError, match="width"):
        FoundADDetector(FoundADDetector.Settings(width=64, heads=4, depth=2)).load_state_dict(tensors)
    with pytest.raises(RuntimeError, match="before fit"):
        FoundADDetector().score(batch)


def test_trainer_hook_replaces_train_projector() -> None:
    clean, corrupted, _, ids = synthetic(4, 2, seed=9)
    det = FoundADDetector(**{k: str(v) for k, v in TINY.items()}, steps="3")
    calls = []

    def trainer(c, x, settings, device, **kw):
        calls.append((tuple(c.shape), tuple(x.shape), settings, device))
        return train_projector(c, x, settings, device, **kw)

    det.trainer_fn = trainer
    det.fit(fit_data(clean, corrupted, ids))
    assert calls == [((8, GRID, GRID, D), (8, GRID, GRID, D), det.settings, "cpu")]
    assert len(det.curve) == 3


def test_known_answer_projector_learns_the_normal_manifold() -> None:
    """Clean tokens live in a rank-4 subspace; corruptions add off-subspace noise on planted patches. The trained
    projector must map corrupted tokens back towards the clean ones far better than the untrained projector and
    than leaving them as they are, and its scores must find the planted patches of held-out images."""
    clean, corrupted, _, ids = synthetic(16, 2, seed=0)
    s = FoundADDetector.Settings(**TINY, steps=150)
    det = FoundADDetector(s).fit(fit_data(clean, corrupted, ids))
    assert det.curve[-1]["loss"] < 0.25 * det.curve[0]["loss"]

    h_clean, h_corr, h_planted, _ = synthetic(16, 1, seed=1)  # held-out images
    untrained, _ = train_projector(clean, corrupted, dataclasses.replace(s, steps=0))
    trained_l2 = projection_error(det.projector, h_corr, target=h_clean).mean().item()
    untrained_l2 = projection_error(untrained, h_corr, target=h_clean).mean().item()
    identity_l2 = (h_corr - h_clean).pow(2).mean().item()
    assert trained_l2 < 0.25 * untrained_l2 and trained_l2 < 0.25 * identity_l2, (trained_l2, untrained_l2, identity_l2)

    batch = TokenSet({7: h_corr.numpy().astype(np.float16)}, [f"t{i}" for i in range(16)], ["c"] * 16, np.ones(16))
    scores = det.score(batch)
    assert auroc(h_planted.numpy(), scores) > 0.9
    # image level: corrupted copies above their clean originals with the default top-10 pooling
    clean_batch = TokenSet({7: h_clean.numpy().astype(np.float16)}, [f"n{i}" for i in range(16)], ["c"] * 16,
                           np.zeros(16))
    image = det.image_scores(np.concatenate([det.score(clean_batch), scores]))
    assert auroc(np.r_[np.zeros(16), np.ones(16)], image) > 0.9


# ------------------------------------------------------------------------------------------------- settings
def test_settings_validation() -> None:
    det = FoundADDetector()
    assert det.pooling == "top:10" and det.trainable and det.name == "foundad"
    inputs = det.inputs()
    assert inputs.corruptions and inputs.scope == "dataset" and inputs.shots == 4 and inputs.layers == (-1,)
    bad = [dict(colour="x"), dict(width="30"), dict(heads="0"), dict(steps="-1"), dict(steps="many"),
           dict(identity_prob="1.5"), dict(input_dropout="1"), dict(lr="0"), dict(pooling="top:0"),
           dict(batch_images="0"), dict(weight_decay="-1")]
    for params in bad:
        with pytest.raises(DetectorConfigError) as e:
            FoundADDetector(**params)
        assert "\n" not in str(e.value) and str(e.value), params
    assert FoundADDetector(width="64", heads="8", steps="10").settings.width == 64
    with pytest.raises(DetectorConfigError, match="foundad needs corrupted"):
        FoundADDetector().fit(FitData())


# ------------------------------------------------------------------------------------------------- Ray Train
@pytest.mark.ray
@pytest.mark.timeout(90)
def test_ray_train_two_workers_ddp(ray_cluster, tmp_path) -> None:
    from spg_dist.ray.foundad_train import WEIGHTS_FILE, load_projector, param_digest, train_projector_ray

    clean, corrupted, _, _ = synthetic(8, 2, seed=11)
    s = FoundADDetector.Settings(**TINY, steps=20, lr=3e-3)
    projector, curve = train_projector_ray(clean, corrupted, s, workers=2, storage_path=str(tmp_path))
    assert [p["step"] for p in curve] == list(range(1, 21))
    assert [p["identity"] for p in curve] == [identity_coin(s.seed, i, s.identity_prob) for i in range(20)]
    untrained, _ = train_projector(clean, corrupted, dataclasses.replace(s, steps=0))
    trained_l2 = projection_error(projector, corrupted, target=clean).mean().item()
    untrained_l2 = projection_error(untrained, corrupted, target=clean).mean().item()
    assert trained_l2 < 0.8 * untrained_l2, (trained_l2, untrained_l2)

    # the round trip: what rank 0 wrote into the Ray Train checkpoint is what came back to the driver
    files = sorted(tmp_path.rglob(WEIGHTS_FILE))
    assert len(files) == 1
    on_disk, meta = load_projector(str(files[0].parent))
    assert meta["world_size"] == 2 and meta["param_digest"] == param_digest(projector)
    assert all(torch.equal(on_disk.state_dict()[k], v) for k, v in projector.state_dict().items())
    det = FoundADDetector(s)
    det.projector = projector
    again = FoundADDetector(s)
    again.load_state_dict(det.state_dict())
    assert all(torch.equal(again.projector.state_dict()[k], v) for k, v in projector.state_dict().items())
