"""Stage 2 guides (pure PyTorch): the scoring rule, pooling, losses and a training step, on tiny tensors with
known answers."""

from __future__ import annotations

import math

import pytest
import torch

from spg_dist.guides import (GuideConfig, GuideConfigError, GuideTrainer, Guides, balanced_bce, dice, focal,
                             image_scores, upsample)
from spg_dist.sae import SAEConfig, TopKSAE


def sae_with_atoms(d=4, C=6):
    sae = TopKSAE(SAEConfig(d=d, C=C, k=2), seed=0)
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(C, d) if C <= d else torch.cat([torch.eye(d), torch.eye(d)[: C - d]]))
        sae.b_pre.zero_()
    return sae


def test_scoring_rule_equals_the_formula():
    sae = sae_with_atoms()
    g = Guides(sae, GuideConfig(temperature=0.07))
    with torch.no_grad():
        g.z_bar.copy_(torch.tensor([[1.0, 0, 0, 0, 0, -1], [0, 2.0, 0, 0, 0, 0]]))
    f = torch.tensor([[[[1.0, 1.0, 0, 0]]]])  # [1, 1, 1, 4]
    gN, gA = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 2.0, 0, 0])  # ReLU drops the -1
    torch.testing.assert_close(g.guides(), torch.stack([gN, gA]))
    lN = torch.nn.functional.cosine_similarity(f[0, 0, 0], gN, dim=0)
    lA = torch.nn.functional.cosine_similarity(f[0, 0, 0], gA, dim=0)
    expect = math.exp(lA / 0.07) / (math.exp(lN / 0.07) + math.exp(lA / 0.07))
    assert g.patch_probs(f).item() == pytest.approx(expect)
    assert g.active_sets(ema=False) == (1, 1)


def test_topk_nonnegativity_keeps_k_g():
    g = Guides(sae_with_atoms(C=6), GuideConfig(nonneg="topk", k_g=2))
    with torch.no_grad():
        g.z_bar.copy_(torch.tensor([[3.0, 1, 2, 0.5, -1, 0], [0, 0, 0, 0, 5, 4]]))
    z = g.coefficients()
    assert (z > 0).sum(1).tolist() == [2, 2] and z[0, 0] == 3 and z[0, 2] == 2


def test_pooling():
    m = torch.tensor([[[0.1, 0.9], [0.2, 0.4]]])
    assert image_scores(m, "max").item() == pytest.approx(0.9)
    assert image_scores(m, "mean").item() == pytest.approx(0.4)
    tau = 0.5
    assert image_scores(m, f"lse:{tau}").item() == pytest.approx(tau * math.log(sum(math.exp(v / tau) for v in
                                                                                    (0.1, 0.9, 0.2, 0.4)) / 4))
    assert image_scores(m, "lse:0.001").item() == pytest.approx(0.9, abs=2e-3)  # tau -> 0 is max pooling
    with pytest.raises(ValueError):
        image_scores(m, "median")


def test_losses_known_values():
    p, y = torch.tensor([[0.9, 0.2]]), torch.tensor([[1.0, 0.0]])
    assert focal(p, y, 2.0).item() == pytest.approx(((0.1 ** 2) * -math.log(0.9) + (0.2 ** 2) * -math.log(0.8)) / 2)
    assert balanced_bce(p, y).item() == pytest.approx((-math.log(0.9) - math.log(0.8)) / 2)
    assert dice(p, y).item() == pytest.approx(1 - 2 * 0.9 / (1.1 + 1.0), abs=1e-5)
    assert dice(y, y).item() == pytest.approx(0.0, abs=1e-5)


def test_upsample_is_bilinear():
    p = torch.tensor([[[0.0, 1.0]]])
    out = upsample(p, (1, 4))
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.25, 0.75, 1.0]]]))


def test_training_separates_anomalous_patches():
    """Anomalous patches point along atom 1, normal ones along atom 0: a few steps make p_A high exactly there."""
    torch.manual_seed(0)
    sae = sae_with_atoms(d=4, C=4)
    tokens = torch.zeros(8, 4, 4, 4)
    tokens[..., 0] = 1.0
    masks = torch.zeros(8, 16, 16)
    tokens[:, 1, 2] = torch.tensor([0.0, 1.0, 0, 0])
    masks[:, 4:8, 8:12] = 1
    tokens += 0.05 * torch.randn_like(tokens)
    tr = GuideTrainer(sae, GuideConfig(loss="bce_dice", temperature=0.2, lr=5e-2, ema=0.0, beta_l1=0.001))
    first = tr.step(tokens, masks)["loss"]
    for _ in range(60):
        last = tr.step(tokens, masks)["loss"]
    assert last < 0.5 * first
    p = tr.guides.patch_probs(tokens, ema=True)
    assert p[:, 1, 2].min() > 0.8 and p[:, 0, 0].max() < 0.2
    assert tr.curve[-1]["step"] == 61


def test_config_round_trip_and_errors():
    c = GuideConfig.preset("classical")
    assert GuideConfig.from_dict(c.to_dict()) == c and not c.subtract_b_pre and c.loss == "bce_dice"
    with pytest.raises(GuideConfigError):
        GuideConfig(nonneg="topk")
    with pytest.raises(GuideConfigError):
        GuideConfig.from_dict({"oops": 1})
