"""Paper fidelity, on hand-built tensors with hand-computed answers (README: "Paper fidelity"; one test group per point):

1. ``Backbone.encode(token="norm")`` = the model's own final-norm tokens (HF ``last_hidden_state``, open_clip's
   ``ln_post`` tokens), ``token="block"`` unchanged, the classical filter bank refuses ``"norm"``;
2. Eq. 9 scores cos(f, g) on the preprocessed token (no ``b_pre``) by default, ``subtract_b_pre=True`` is an option;
3. the paper's plain 0.999 EMA (no warm-up), the warm-up as an option, old configs load with their warm-up;
4. the TopK-guide variant has no L1 term, ReLU guides keep it;
5. log-sum-exp pooling is float64: float32 drifts at large tau / overflows at tiny tau, ``pool`` does not.
"""

from __future__ import annotations

import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from spg_dist.backbones import (
    TOKEN_CHOICES,
    NoFinalNormError,
    TokenChoiceError,
    WeightsMismatchError,
    create_backbone,
)
from spg_dist.errors import SpgError
from spg_dist.evaluation.pooling import pool
from spg_dist.guides import GuideConfig, Guides, GuideTrainer
from spg_dist.guides.config import LEGACY_DEFAULTS
from spg_dist.guides.losses import EPS
from spg_dist.sae import SAEConfig, TopKSAE

# ------------------------------------------------------------------ 1. tokens before / after the final norm

TINY = ["tiny-dinov2", "tiny-dinov3", "tiny-siglip", "tiny-openclip"]
FINAL_NORM = {"tiny-dinov2": "layernorm", "tiny-dinov3": "norm", "tiny-siglip": "post_layernorm",
              "tiny-openclip": "ln_post"}  # the module each library applies after its last block


def _images(n: int = 2, size: int = 224) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def _backbone_with_affine_norm(name: str):
    """A private build whose final norm has non-trivial weight/bias (random init leaves it 1/0, which would let a
    wrong LayerNorm with the same eps pass)."""
    backbone = create_backbone(name)
    owner = backbone.visual if name == "tiny-openclip" else backbone.model
    norm = getattr(owner, FINAL_NORM[name])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g))
        norm.bias.copy_(0.3 * torch.randn(norm.bias.shape, generator=g))
    return backbone, norm


def _model_outputs(backbone, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """The library's own forward: (its output patch tokens with prefix dropped [B, N, d], HF hidden_states)."""
    pixels = backbone.normalise(x)
    p = backbone.config.num_prefix_tokens
    with torch.no_grad():
        if backbone.config.family == "openclip":
            visual = backbone.visual
            visual.output_tokens = True
            try:
                _, tokens = visual(pixels)  # ln_post(x)[:, 1:], not projected (only the pooled vector is)
            finally:
                visual.output_tokens = False
            return tokens, None
        out = backbone.model(pixel_values=pixels, output_hidden_states=True, **backbone._forward_kwargs)
        return out.last_hidden_state[:, p:], out.hidden_states


def test_token_choices_are_exported():
    assert TOKEN_CHOICES == ("block", "norm")
    with pytest.raises(TokenChoiceError, match="block, norm"):
        create_backbone("tiny-dinov2").encode(_images(1), token="final")


@pytest.mark.parametrize("name", TINY)
def test_norm_tokens_are_the_models_own_output(name):
    backbone, norm = _backbone_with_affine_norm(name)
    x = _images()
    cfg = backbone.config
    hp = cfg.image_size // cfg.patch_size
    theirs, hidden = _model_outputs(backbone, x)
    assert theirs.shape == (2, hp * hp, cfg.dim)
    ours = backbone.encode(x, layers=[-1, 1], token="norm")
    torch.testing.assert_close(ours[cfg.num_layers], theirs.reshape(2, hp, hp, -1), rtol=0, atol=0)
    block = backbone.encode(x, layers=[-1, 1])
    assert not torch.allclose(block[cfg.num_layers], ours[cfg.num_layers], atol=1e-3)  # the norm does something
    # "block" is unchanged: the block output as the library exposes it, and the default
    assert torch.equal(block[1], backbone.encode(x, layers=[1], token="block")[1])
    if hidden is not None:
        p = cfg.num_prefix_tokens
        torch.testing.assert_close(block[cfg.num_layers], hidden[cfg.num_layers][:, p:].reshape(2, hp, hp, -1),
                                   rtol=0, atol=0)
        # an intermediate layer: the whole sequence through the final norm, then the prefix dropped
        with torch.no_grad():
            expect = norm(hidden[1])[:, p:].reshape(2, hp, hp, -1)
        torch.testing.assert_close(ours[1], expect, rtol=0, atol=0)
    else:
        with torch.no_grad():
            expect = norm(block[1].reshape(2, hp * hp, -1)).reshape(2, hp, hp, -1)  # LayerNorm is per token
        torch.testing.assert_close(ours[1], expect, rtol=1e-5, atol=1e-5)


def test_classical_filter_bank_has_no_final_norm():
    backbone = create_backbone("texture-filterbank")
    with pytest.raises(NoFinalNormError) as err:
        backbone.encode(_images(1), token="norm")
    text = str(err.value)
    assert isinstance(err.value, SpgError) and isinstance(err.value, ValueError)
    assert "no final norm" in text and "texture-filterbank" in text and "\n" not in text
    assert not isinstance(err.value, WeightsMismatchError)  # a token choice, not a weights problem
    assert backbone.encode(_images(1), token="block")[1].shape == (1, 14, 14, backbone.dim)


# ------------------------------------------------------------------ 2. Eq. 9: cos(f, g), b_pre only as an option

def _cos(a: list[float], b: list[float]) -> float:
    return math.fsum(x * y for x, y in zip(a, b)) / math.sqrt(math.fsum(x * x for x in a) * math.fsum(y * y for y in b))


def _p_anomaly(f: list[float], g_n: list[float], g_a: list[float], t: float) -> float:
    ln, la = _cos(f, g_n) / t, _cos(f, g_a) / t
    return math.exp(la) / (math.exp(ln) + math.exp(la))


W_DEC = [[1.0, 0.0, 0.5], [0.0, 2.0, 0.0], [0.5, 0.5, 0.5], [-1.0, 0.0, 1.0]]  # atoms = rows, C=4, d=3
B_PRE = [0.5, -1.0, 2.0]


def _sae() -> TopKSAE:
    sae = TopKSAE(SAEConfig(d=3, C=4, k=2), seed=0)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor(W_DEC))
        sae.b_pre.copy_(torch.tensor(B_PRE))
    return sae


def test_eq9_scores_the_raw_token_and_b_pre_is_an_option():
    assert GuideConfig().subtract_b_pre is False and GuideConfig.preset("paper") == GuideConfig()
    assert GuideConfig.preset("classical").subtract_b_pre is False
    z = [[1.0, 0.0, 2.0, -1.0], [0.0, 1.5, 0.0, 0.5]]  # ReLU drops the -1
    g_n = [sum(max(z[0][i], 0) * W_DEC[i][j] for i in range(4)) for j in range(3)]
    g_a = [sum(max(z[1][i], 0) * W_DEC[i][j] for i in range(4)) for j in range(3)]
    assert g_n == [2.0, 1.0, 1.5] and g_a == [-0.5, 3.0, 0.5]
    tokens = [[1.0, 2.0, 0.5], [0.2, -0.3, 2.5]]
    x = torch.tensor(tokens).reshape(1, 1, 2, 3)
    got = {}
    for subtract in (False, True):
        guides = Guides(_sae(), GuideConfig(subtract_b_pre=subtract))
        with torch.no_grad():
            guides.z_bar.copy_(torch.tensor(z))
        torch.testing.assert_close(guides.guides(), torch.tensor([g_n, g_a]))
        got[subtract] = guides.patch_probs(x)[0, 0].tolist()
    paper = [_p_anomaly(f, g_n, g_a, 0.07) for f in tokens]
    centred = [_p_anomaly([a - b for a, b in zip(f, B_PRE)], g_n, g_a, 0.07) for f in tokens]
    assert got[False] == pytest.approx(paper, abs=1e-6)
    assert got[True] == pytest.approx(centred, abs=1e-6)
    assert max(abs(a - b) for a, b in zip(paper, centred)) > 0.1  # the two settings really differ here


# ------------------------------------------------------------------ 3. EMA: plain 0.999 (paper), warm-up option

def _run_ema(config: GuideConfig, seq: list[list[float]], z0: list[float]) -> torch.Tensor:
    guides = Guides(_sae(), config)
    with torch.no_grad():
        guides.z_bar.copy_(torch.tensor([z0, z0]))
        guides.z_ema.copy_(guides.z_bar)  # z_ema starts at the initial coefficients
        for z in seq:
            guides.z_bar.copy_(torch.tensor([z, z]))
            guides.update_ema()
    assert int(guides.ema_steps) == len(seq)
    return guides.z_ema[0].double()


def _sequence(n: int) -> list[list[float]]:
    return [[math.sin(0.3 * t), 0.01 * t, (-1.0) ** t, 2.0] for t in range(1, n + 1)]


def test_plain_ema_is_the_closed_form_mix():
    n, a = 60, 0.999
    z0, seq = [1.0, -2.0, 0.5, 0.0], _sequence(60)
    expect = [math.fsum([a ** n * z0[j]] + [(1 - a) * a ** (n - i) * seq[i - 1][j] for i in range(1, n + 1)])
              for j in range(4)]
    got = _run_ema(GuideConfig(), seq, z0)  # the paper default: no warm-up
    torch.testing.assert_close(got, torch.tensor(expect, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert got[0].item() == pytest.approx(0.999 ** 60 * 1.0 + 0.001 * sum(a ** (n - i) * math.sin(0.3 * i)
                                                                           for i in range(1, n + 1)), abs=1e-6)


def test_warmup_ema_is_its_closed_form():
    """decay_t = (1+t)/(10+t) below 0.999: z0 weighs 9! n!/(n+9)!, step i's z weighs 9/(9+i) · n!(i+9)!/(i!(n+9)!)."""
    n = 40
    z0, seq = [1.0, -2.0, 0.5, 0.0], _sequence(n)
    f = math.factorial
    w0 = f(9) * f(n) / f(n + 9)
    w = [9 / (9 + i) * f(n) * f(i + 9) / (f(i) * f(n + 9)) for i in range(1, n + 1)]
    assert math.fsum([w0, *w]) == pytest.approx(1.0, abs=1e-12)
    expect = [math.fsum([w0 * z0[j]] + [w[i - 1] * seq[i - 1][j] for i in range(1, n + 1)]) for j in range(4)]
    got = _run_ema(GuideConfig(ema_warmup=True), seq, z0)
    torch.testing.assert_close(got, torch.tensor(expect, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_ema_presets_and_old_configs():
    paper, classical = GuideConfig.preset("paper"), GuideConfig.preset("classical")
    assert not paper.ema_warmup and paper.ema == 0.999 and classical.ema_warmup and classical.steps == 150
    assert 0.999 ** paper.steps < 0.01 and paper.steps == 5000 and 0.999 ** 4602 > 0.01 > 0.999 ** 4603
    # a row stored before the field existed had the warm-up always on (and L1 always in the loss)
    old = {k: v for k, v in classical.to_dict().items() if k not in LEGACY_DEFAULTS}
    loaded = GuideConfig.from_dict(old)
    assert loaded.ema_warmup is True and loaded.l1_with_topk is True and loaded.subtract_b_pre is False
    assert Guides(_sae(), loaded).ema_decay(0) == pytest.approx(0.1)
    old_paper = {k: v for k, v in paper.to_dict().items() if k not in LEGACY_DEFAULTS}
    assert GuideConfig.from_dict(old_paper).ema_warmup is True
    for cfg in (paper, classical, GuideConfig(ema_warmup=True, subtract_b_pre=True)):
        assert GuideConfig.from_dict(cfg.to_dict()) == cfg  # new rows round-trip exactly


def test_one_training_step_uses_the_plain_ema():
    tr = GuideTrainer(_sae(), GuideConfig())
    z0 = tr.guides.z_bar.detach().clone()
    tokens, masks = torch.randn(2, 2, 2, 3, generator=torch.Generator().manual_seed(0)), torch.zeros(2, 2, 2)
    masks[:, 0, 0] = 1
    tr.step(tokens, masks)
    torch.testing.assert_close(tr.guides.z_ema, 0.999 * z0 + 0.001 * tr.guides.z_bar.detach())


# ------------------------------------------------------------------ 4. TopK guides: no L1 term

def _hand_loss(p: list[float], y: list[float], gamma: float = 2.0, lam: float = 1.0) -> float:
    """focal + λ·dice computed from the patch probabilities by hand (mask grid = token grid: no upsampling)."""
    pt = [min(max(v, EPS), 1 - EPS) for v in p]
    pt = [v if t > 0.5 else 1 - v for v, t in zip(pt, y)]
    focal = math.fsum(-(1 - v) ** gamma * math.log(v) for v in pt) / len(pt)
    inter = math.fsum(a * b for a, b in zip(p, y))
    dice = 1 - (2 * inter + EPS) / (math.fsum(p) + math.fsum(y) + EPS)
    return focal + lam * dice


@pytest.mark.parametrize("nonneg,l1_with_topk,has_l1", [("relu", False, True), ("topk", False, False),
                                                         ("topk", True, True)])
def test_topk_variant_drops_the_l1_term(nonneg, l1_with_topk, has_l1):
    cfg = GuideConfig(nonneg=nonneg, k_g=2 if nonneg == "topk" else None, beta_l1=0.5, l1_with_topk=l1_with_topk)
    assert cfg.l1_in_loss is has_l1
    tr = GuideTrainer(_sae(), cfg)
    with torch.no_grad():
        tr.guides.z_bar.copy_(torch.tensor([[1.0, 0.2, 2.0, -1.0], [0.3, 1.5, 0.1, 0.5]]))
    z_tilde = tr.guides.coefficients().detach()
    l1 = float(z_tilde.sum())
    assert l1 == pytest.approx(3.2 + 2.4 if nonneg == "relu" else 3.0 + 2.0)  # ReLU: all positives; TopK: 2 per row
    tokens = torch.tensor([[[[1.0, 2.0, 0.5], [0.2, -0.3, 2.5]], [[-1.0, 0.5, 0.5], [2.0, 0.1, 0.1]]]])
    masks = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    p = tr.guides.patch_probs(tokens)[0].flatten().tolist()
    seg_dice = _hand_loss(p, masks.flatten().tolist())
    total, parts = tr.loss(tokens, masks)
    total = total.detach()
    assert parts["l1"] == pytest.approx(l1)  # always reported
    assert float(total) == pytest.approx(seg_dice + (0.5 * l1 if has_l1 else 0.0), abs=1e-6)
    assert parts["loss"] == pytest.approx(float(total))


# ------------------------------------------------------------------ 5. log-sum-exp pooling in float64


def _lse_reference(values: list[float], tau: float) -> float:
    """τ log mean exp(v/τ) in Python floats (exact float64 of the float32 inputs), max-shifted, summed by fsum."""
    m = max(values) / tau
    return tau * (m + math.log(math.fsum(math.exp(v / tau - m) for v in values) / len(values)))


def test_lse_pooling_is_float64():
    maps = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    values = [float(v) for v in maps.flatten()]
    x = maps.flatten()

    def naive32(tau: float) -> float:  # τ log mean exp(x/τ), all float32
        t = torch.tensor(tau, dtype=torch.float32)
        return float(t * torch.log(torch.exp(x / t).mean()))

    def shifted32(tau: float) -> float:  # the max-shifted form, still float32
        t = torch.tensor(tau, dtype=torch.float32)
        return float(t * (torch.logsumexp(x / t, 0) - torch.log(torch.tensor(float(x.numel())))))

    # large τ: every exp(x/τ) ≈ 1, float32's 6e-8 relative resolution of their mean is multiplied by τ
    tau = 1000.0
    ref = _lse_reference(values, tau)
    for f32 in (naive32(tau), shifted32(tau)):
        assert 1e-5 < abs(f32 - ref) < 1e-3  # ~1e-4
    assert abs(pool(maps, f"lse:{tau:g}")[0] - ref) < 1e-12
    # tiny τ: the plain form overflows float32 (exp(x/τ) > 3.4e38), the shifted float32 form stays ~1e-8 close
    tau = 1e-3
    ref = _lse_reference(values, tau)
    assert math.isinf(naive32(tau))
    assert abs(shifted32(tau) - ref) < 1e-6
    assert abs(pool(maps, f"lse:{tau:g}")[0] - ref) < 1e-12
    assert ref == pytest.approx(max(values), abs=tau * math.log(256))  # τ -> 0 is max pooling
