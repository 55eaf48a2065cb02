"""Token preprocessing steps (center, standardize, scale, constant): equations on tiny tensors, round trips, and
the guarantee that every stage applies them the same way (raw vs. preloaded training, per-image loading)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from spg_dist.ray.sae_data import preprocess_images
from spg_dist.guides import GuideConfig
from spg_dist.guides.model import Guides
from spg_dist.sae import MultiSAETrainer, Preprocessing, SAEConfig, TopKSAE, TrainConfig
from spg_dist.sae.config import SAEConfigError
from spg_dist.sae.preprocess import STEPS, parse_steps


def images(b=3, p=5, d=4, seed=0) -> torch.Tensor:
    return torch.randn(b, p, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3 + 1


def test_parse_steps_orders_and_rejects():
    assert parse_steps("constant, center") == ("center", "constant")
    assert parse_steps("none") == () and parse_steps(None) == () and parse_steps(["scale"]) == ("scale",)
    assert parse_steps(",".join(reversed(STEPS))) == STEPS
    with pytest.raises(SAEConfigError, match="whiten"):
        parse_steps("center,whiten")


def test_each_step_by_hand():
    x = torch.tensor([[[1.0, 10.0], [3.0, 20.0], [8.0, 60.0]]], dtype=torch.float64)  # one image, 3 patches
    centred = Preprocessing(center=True).apply(x)
    assert torch.equal(centred, x - torch.tensor([3.0, 20.0], dtype=torch.float64))  # coordinate-wise median
    std = Preprocessing(mean=(1.0, 10.0), std=(2.0, 5.0)).apply(x)
    assert torch.allclose(std[0, 2], torch.tensor([3.5, 10.0], dtype=torch.float64))
    const = Preprocessing(scale=0.5, constant=7.0).apply(x)
    assert const.shape == (1, 3, 3) and torch.equal(const[..., :2], x * 0.5) and (const[..., 2] == 7.0).all()
    # all four in the documented order: center -> standardize -> scale -> constant
    pre = Preprocessing(center=True, mean=(0.0, 1.0), std=(2.0, 4.0), scale=3.0, constant=0.5)
    want = torch.cat([(x - torch.tensor([3.0, 20.0], dtype=torch.float64) - torch.tensor([0.0, 1.0],
                                                                                         dtype=torch.float64))
                      / torch.tensor([2.0, 4.0], dtype=torch.float64) * 3.0, torch.full((1, 3, 1), 0.5,
                                                                                        dtype=torch.float64)], -1)
    assert torch.allclose(pre.apply(x), want)
    assert pre.out_dim(2) == 3 and pre.extra_dims == 1 and pre.needs_images and not pre.is_identity
    # invert drops the constant and undoes scale and standardisation (not the per-image median)
    assert torch.allclose(pre.invert(pre.apply(x)), x - torch.tensor([3.0, 20.0], dtype=torch.float64))


def test_fit_statistics():
    x = images()
    pre = Preprocessing.fit(x, steps="center,standardize,scale,constant")
    c = x - x.median(dim=1, keepdim=True).values
    flat = c.reshape(-1, 4)
    assert torch.allclose(torch.tensor(pre.mean, dtype=torch.float64), flat.mean(0))
    assert torch.allclose(torch.tensor(pre.std, dtype=torch.float64), flat.std(0))
    z = (flat - flat.mean(0)) / flat.std(0)
    assert math.isclose(pre.scale, math.sqrt(4 / float(z.pow(2).sum(-1).mean())), rel_tol=1e-12)
    assert math.isclose(pre.constant, float((z * pre.scale).norm(dim=-1).median()), rel_tol=1e-12)
    y = pre.apply(x).reshape(-1, 5)
    assert math.isclose(float(y[:, :4].pow(2).sum(-1).mean()), 4.0, rel_tol=1e-9)  # unit mean square per dim
    # a constant dimension is left unscaled instead of divided by ~0
    flat_dim = torch.cat([x, torch.full((3, 5, 1), 2.0, dtype=torch.float64)], -1)
    assert Preprocessing.fit(flat_dim, steps="standardize").std[-1] == 1.0
    # the old API still means "input scale only"
    assert Preprocessing.fit(x.reshape(-1, 4)) == Preprocessing.fit(x, steps="scale")
    assert Preprocessing.fit(x, mode="none").is_identity


def test_centring_refuses_loose_tokens():
    pre = Preprocessing(center=True)
    with pytest.raises(ValueError, match="whole images"):
        pre.apply(torch.randn(10, 4))
    with pytest.raises(ValueError, match="whole images"):
        Preprocessing.fit(torch.randn(10, 4), steps="center")
    assert pre.apply(torch.randn(2, 3, 3, 4)).shape == (2, 3, 3, 4)  # [B, h, w, d]: median over h*w


def test_round_trip_validation_and_repr():
    pre = Preprocessing.fit(images(), steps="center,standardize,scale,constant")
    back = Preprocessing.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert back == pre and hash(back) == hash(pre)
    assert "standardize(d=4)" in repr(pre) and len(repr(pre)) < 120
    with pytest.raises(SAEConfigError, match="mean and std"):
        Preprocessing(mean=(0.0,))
    with pytest.raises(SAEConfigError, match="std"):
        Preprocessing(mean=(0.0, 1.0), std=(1.0, 0.0))
    with pytest.raises(SAEConfigError, match="constant"):
        Preprocessing(constant=-1.0)
    with pytest.raises(ValueError, match="d=4"):
        pre.apply(torch.randn(2, 3, 5))


def test_sae_with_appended_constant_reads_raw_tokens():
    pre = Preprocessing.fit(images(d=6), steps="standardize,constant")
    sae = TopKSAE(SAEConfig(d=7, C=16, k=2), pre)
    assert sae.raw_dim == 6
    values, indices = sae.encode(torch.randn(3, 5, 6))
    assert values.shape == (3, 5, 2)
    with pytest.raises(ValueError, match="input dim 6"):
        sae.encode(torch.randn(4, 7))
    with pytest.raises(SAEConfigError, match="does not fit d=6"):
        TopKSAE(SAEConfig(d=6, C=16, k=2), pre)  # the constant needs d = raw + 1
    restored = TopKSAE.from_bytes(sae.to_bytes())
    assert restored.preprocessing == pre and restored.raw_dim == 6


def test_training_on_preloaded_tokens_equals_training_on_raw_tokens():
    """The Ray worker preprocesses its shard once and steps with preprocessed=True; that must be the same
    training as feeding raw tokens (here with a loose-token preprocessing, where both paths exist)."""
    x = images(b=8, p=64, d=6, seed=3).float()
    pre = Preprocessing.fit(x, steps="standardize,scale,constant")
    flat = x.reshape(-1, 6)
    runs = []
    for preloaded in (False, True):
        tr = MultiSAETrainer([SAEConfig(d=7, C=32, k=4)], TrainConfig(batch_tokens=128, seed=0), pre)
        feed = pre.apply(flat) if preloaded else flat
        tr.init_from_sample(feed, preprocessed=preloaded)
        for i in range(4):
            tr.step(feed[i * 128:(i + 1) * 128], preprocessed=preloaded)
        runs.append(tr.saes[0].state_dict())
    for name in runs[0]:
        assert torch.allclose(runs[0][name], runs[1][name], atol=1e-6), name


def test_preprocess_images_applies_per_image_on_ragged_shards():
    pre = Preprocessing(center=True, scale=2.0, constant=1.0)
    a, b = images(b=2, p=4, d=3, seed=1).float(), images(b=1, p=6, d=3, seed=2).float()
    flat = torch.cat([a.reshape(-1, 3), b.reshape(-1, 3)]).half()
    got = preprocess_images(flat, np.array([4, 4, 6]), pre)
    want = torch.cat([pre.apply(a.half()).reshape(-1, 4), pre.apply(b.half()).reshape(-1, 4)]).half()
    assert got.dtype == torch.float16 and torch.equal(got, want)


def test_guides_see_the_sae_preprocessing():
    pre = Preprocessing(center=True, constant=3.0)
    sae = TopKSAE(SAEConfig(d=5, C=8, k=2), pre)
    g = Guides(sae, GuideConfig(subtract_b_pre=False))
    toks = torch.randn(2, 3, 3, 4)
    f = g.features(toks)
    assert f.shape == (2, 3, 3, 5) and torch.allclose(f, pre.apply(toks))
    assert g.patch_probs(toks).shape == (2, 3, 3)


def test_cli_rejects_an_unknown_step_in_one_line():
    from click.testing import CliRunner

    from spg_dist.cli import main

    res = CliRunner().invoke(main, ["train-sae", "--backbone", "x", "--preprocess", "center,whiten"])
    assert res.exit_code == 2 and "unknown preprocessing step(s) ['whiten']" in res.output
    assert "Traceback" not in res.output
