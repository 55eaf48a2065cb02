"""spg_dist.sae: TopK SAE, sparse autograd, AuxK, trackers, trainer, checkpoints (tiny tensors, known answers)."""

from __future__ import annotations

import copy

import json

import pytest
import torch

from spg_dist.sae import (DeadLatentTracker, MultiSAETrainer, NonFiniteLossError, Preprocessing, SAEConfig,
                          SAEConfigError, TopKSAE, TrainConfig, explained_variance, firing_frequency_histogram_png,
                          geometric_median, l0, load_checkpoint, nmse, save_checkpoint)


def toy_tokens(n: int, d: int = 16, atoms: int = 48, active: int = 3, seed: int = 0) -> torch.Tensor:
    """Tokens that ARE sparse: each a positive combination of `active` of `atoms` unit directions + noise."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(atoms, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    idx = torch.rand(n, atoms, generator=g).argsort(1)[:, :active]
    coef = torch.rand(n, active, generator=g) * 2 + 0.5
    return (coef[:, :, None] * D[idx]).sum(1) + 0.01 * torch.randn(n, d, generator=g)


def perturbed_sae(cfg: SAEConfig, seed: int = 1, dtype: torch.dtype = torch.float64) -> TopKSAE:
    """An SAE whose parameters are all non-trivial (random biases, W_enc != W_dec), so every gradient path
    is exercised."""
    sae = TopKSAE(cfg, seed=seed).to(dtype)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.b_pre.copy_(0.3 * torch.randn(cfg.d, generator=g, dtype=dtype))
        sae.b_enc.copy_(0.2 * torch.randn(cfg.C, generator=g, dtype=dtype))
        sae.W_enc.add_(0.1 * torch.randn(cfg.C, cfg.d, generator=g, dtype=dtype))
    return sae


def dense_reference(sae: TopKSAE, x: torch.Tensor, dead_mask: torch.Tensor | None = None):
    """A plain dense-autograd TopK/BatchTopK SAE (+AuxK) on the SAME parameters: the ground truth."""
    cfg = sae.config
    n = x.shape[0]
    pre = (x - sae.b_pre) @ sae.W_enc.T + sae.b_enc
    if cfg.sparsifier == "topk":
        vals, idx = pre.topk(cfg.k, dim=1)
        z = torch.zeros_like(pre).scatter(1, idx, vals.relu())
    else:
        vals, idx = pre.reshape(-1).topk(n * cfg.k)
        z = torch.zeros_like(pre).reshape(-1).scatter(0, idx, vals.relu()).view_as(pre)
    x_hat = z @ sae.W_dec + sae.b_pre
    loss = (x - x_hat).pow(2).sum(-1).mean()
    total = loss
    if dead_mask is not None and cfg.auxk and dead_mask.any():
        num_dead = int(dead_mask.sum())
        k_aux = min(cfg.k_aux_effective, num_dead)
        avals, aidx = pre.masked_fill(~dead_mask, float("-inf")).topk(k_aux, dim=1)
        e_hat = torch.zeros_like(pre).scatter(1, aidx, avals.relu()) @ sae.W_dec
        if cfg.aux_fit_scale:  # least-squares scale onto the residual, treated as a constant
            r = (x - x_hat).detach()
            e_hat = e_hat * ((e_hat * r).sum(-1, keepdim=True) / e_hat.pow(2).sum(-1, keepdim=True)).clamp(0, 1).detach()
        aux_sse = (e_hat - (x - x_hat).detach()).pow(2).sum()
        total = loss + cfg.aux_coef * min(num_dead / cfg.k_aux_effective, 1.0) * aux_sse / n
    return z, x_hat, loss, total


# ------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("kwargs, field", [
    (dict(d=8, C=16, k=16), "k=16"), (dict(d=8, C=16, k=20), "k=20"), (dict(d=8, C=16, k=0), "k=0"),
    (dict(d=8, C=16, k=-1), "k=-1"), (dict(d=8, C=0, k=1), "C=0"), (dict(d=0, C=16, k=4), "d=0"),
    (dict(d=8, C=16, k=4, sparsifier="relu"), "sparsifier"), (dict(d=8, C=16, k=4, init_b_pre="median"), "init_b_pre"),
])
def test_bad_configs_raise(kwargs, field):
    with pytest.raises(SAEConfigError) as err:
        SAEConfig(**kwargs)
    assert field in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


def test_config_and_preprocessing_dicts_round_trip():
    cfg = SAEConfig(d=1024, C=8192, k=32, sparsifier="batchtopk", auxk=False, k_aux=100, aux_coef=0.05,
                    dead_tokens=123, init_b_pre="mean")
    assert SAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    default = SAEConfig(d=1024, C=8192, k=32)
    assert SAEConfig.from_dict(json.loads(json.dumps(default.to_dict()))) == default
    assert default.to_dict()["k_aux"] is None and default.k_aux_effective == 512
    assert SAEConfig(d=64, C=16, k=4).k_aux_effective == 16  # d // 2 = 32 clamped to C
    assert default.name == "topk-C8192-k32" and cfg.name == "batchtopk-C8192-k32"
    assert SAEConfig.from_dict({"d": 4, "C": 8, "k": 2}) == SAEConfig(d=4, C=8, k=2)  # missing keys = defaults
    with pytest.raises(SAEConfigError, match="unknown keys"):
        SAEConfig.from_dict({"d": 4, "C": 8, "k": 2, "whatever": 1})
    train = TrainConfig(lr=3e-4, betas=(0.8, 0.99), dead_tokens=1000, seed=7, autocast_bf16=False, scale_mode="none")
    assert TrainConfig.from_dict(json.loads(json.dumps(train.to_dict()))) == train
    pre = Preprocessing(scale=0.123456789)
    assert Preprocessing.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    assert Preprocessing.from_dict({}) == Preprocessing() and Preprocessing.from_dict(None) == Preprocessing()
    with pytest.raises(SAEConfigError, match="unknown steps"):
        Preprocessing.from_dict({"scale": 1.0, "center_per_image": True})


def test_preprocessing_fit_and_apply():
    x = (torch.randn(500, 32) * 7 + 3).half()
    pre = Preprocessing.fit(x)
    y = pre.apply(x)
    assert y.dtype == torch.float32
    assert y.pow(2).sum(-1).mean().item() == pytest.approx(32.0, rel=1e-4)  # unit mean square per dimension
    assert torch.allclose(pre.invert(y), x.float(), rtol=1e-5, atol=1e-4)
    assert Preprocessing.fit(x, mode="none").scale == 1.0
    with pytest.raises(SAEConfigError):
        Preprocessing.fit(x, mode="whiten")


def test_geometric_median_is_robust():
    # 1-D points on a line in 2-D: the geometric median is the ordinary median (2, 0), the mean is (21.2, 0).
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [100.0, 0.0]])
    assert torch.allclose(geometric_median(pts, max_iter=500, tol=0), torch.tensor([2.0, 0.0], dtype=torch.float64), atol=2e-2)
    sym = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]) + torch.tensor([5.0, -2.0])
    assert torch.allclose(geometric_median(sym), torch.tensor([5.0, -2.0], dtype=torch.float64), atol=1e-6)


# ------------------------------------------------------------------------------------------- encode/decode
def test_encode_matches_dense_topk_reference():
    cfg = SAEConfig(d=12, C=40, k=5)
    sae = perturbed_sae(cfg)
    with torch.no_grad():
        sae.b_enc.sub_(1.0)  # some selected pre-activations negative: ReLU must zero them
    sae.preprocessing = Preprocessing(scale=0.5)
    x = torch.randn(30, 12, dtype=torch.float64)
    values, indices = sae.encode(x)
    assert values.shape == indices.shape == (30, 5) and (values >= 0).all()
    with torch.no_grad():
        pre = (0.5 * x - sae.b_pre) @ sae.W_enc.T + sae.b_enc  # preprocessing applied by the model itself
        ref_vals, ref_idx = pre.topk(5, dim=1)
    order = indices.argsort(1)
    ref_order = ref_idx.argsort(1)
    assert torch.equal(indices.gather(1, order), ref_idx.gather(1, ref_order))
    assert torch.allclose(values.gather(1, order), ref_vals.relu().gather(1, ref_order))
    assert (ref_vals < 0).any() and (values == 0).any()  # ReLU after TopK was exercised
    z = sae.encode_dense(x)
    assert torch.allclose(z.gather(1, indices), values) and ((z != 0).sum(1) <= 5).all()
    # leading dims are kept: [B, T, d] -> [B, T, k]
    v3, i3 = sae.encode(x.view(5, 6, 12))
    assert v3.shape == (5, 6, 5) and torch.equal(i3.view(30, 5), indices)


def test_sparse_decode_matches_dense():
    cfg = SAEConfig(d=12, C=40, k=5)
    sae = perturbed_sae(cfg)
    x = torch.randn(30, 12, dtype=torch.float64)
    values, indices = sae.encode(x)
    z = sae.encode_dense(x)
    assert torch.allclose(sae.decode(values, indices), z @ sae.W_dec + sae.b_pre)
    assert torch.allclose(sae.decode(values, indices), sae.decode_dense(z))


@pytest.mark.parametrize("sparsifier", ["topk", "batchtopk"])
@pytest.mark.parametrize("with_aux", [False, True])
def test_sparse_gradients_equal_dense_autograd(sparsifier, with_aux):
    cfg = SAEConfig(d=10, C=48, k=4, sparsifier=sparsifier, k_aux=6, aux_coef=0.25)
    sae = perturbed_sae(cfg)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::3] = True  # 16 dead latents
    mask = dead if with_aux else None
    x = torch.randn(24, 10, dtype=torch.float64, requires_grad=True)

    out = sae(x, mask)
    out.total.backward()
    sparse = {n: p.grad.clone() for n, p in sae.named_parameters()} | {"x": x.grad.clone()}
    sae.zero_grad()
    x.grad = None

    z, x_hat, loss, total = dense_reference(sae, x, mask)
    total.backward()
    dense = {n: p.grad.clone() for n, p in sae.named_parameters()} | {"x": x.grad.clone()}

    assert torch.allclose(out.x_hat, x_hat) and torch.allclose(out.loss, loss) and torch.allclose(out.total, total)
    assert (out.aux_loss > 0) == with_aux
    for name in ("W_enc", "b_enc", "W_dec", "b_pre", "x"):
        assert torch.allclose(sparse[name], dense[name], rtol=1e-10, atol=1e-12), name
        assert sparse[name].abs().sum() > 0, name


def test_batchtopk_keeps_exactly_n_times_k_in_training():
    cfg = SAEConfig(d=8, C=32, k=3, sparsifier="batchtopk")
    sae = TopKSAE(cfg, seed=3)
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # every pre-activation positive: all N*k kept entries are active
    x = torch.randn(50, 8)
    sae.train()
    out = sae(x)
    assert int((out.values > 0).sum()) == 50 * 3
    assert out.values.shape[1] == int((out.values > 0).sum(1).max())  # padded to the largest per-token count
    per_token = (out.values > 0).sum(1)
    assert per_token.min() != per_token.max()  # variable per token: it is really a batch-level budget
    assert l0(out.values).item() == pytest.approx(3.0)
    thr = float(sae.threshold)
    assert thr == pytest.approx(float(out.values.detach()[out.values > 0].min()))  # first EMA value = the batch minimum
    sae.eval()  # inference: the stored threshold, per token
    values, indices = sae.encode(x)
    assert ((values == 0) | (values > thr)).all()
    counts = (values > 0).sum(1)
    with torch.no_grad():
        pre = (x - sae.b_pre) @ sae.W_enc.T + sae.b_enc
    assert torch.equal(counts, (pre > thr).sum(1))


def test_token_dimension_mismatch_raises():
    sae = TopKSAE(SAEConfig(d=16, C=32, k=4))
    with pytest.raises(ValueError, match=r"17.*d=16"):
        sae.encode(torch.randn(3, 17))
    with pytest.raises(ValueError, match=r"17.*d=16"):
        sae(torch.randn(3, 17))
    trainer = MultiSAETrainer([SAEConfig(d=16, C=32, k=4, init_b_pre="zeros")], preprocessing=Preprocessing())
    with pytest.raises(ValueError, match=r"8.*d=16"):
        trainer.step(torch.randn(4, 8))


# ---------------------------------------------------------------------------------------------- training
def test_trainer_keeps_atoms_unit_norm_and_removes_parallel_grads():
    X = toy_tokens(2048)
    trainer = MultiSAETrainer([SAEConfig(d=16, C=64, k=4), SAEConfig(d=16, C=32, k=2, sparsifier="batchtopk")],
                              TrainConfig(lr=1e-2))
    trainer.init_from_sample(X)
    for s in range(5):
        trainer.step(X[s * 256:(s + 1) * 256])
    for sae in trainer.saes:
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.C), atol=1e-5)
        sae.zero_grad()
        sae(X[:256]).total.backward()
        assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() > 1e-4  # there was a parallel component
        sae.remove_parallel_grads()
        assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-6
        assert sae.W_dec.grad.abs().sum() > 0


def test_loss_decreases_on_toy_data():
    X = toy_tokens(16384, seed=1)
    trainer = MultiSAETrainer([SAEConfig(d=16, C=64, k=4)], TrainConfig(lr=3e-3))
    trainer.init_from_sample(X[:4096])
    history = [trainer.step(X[s * 256:(s + 1) * 256])[0] for s in range(64)]
    first, last = history[0], history[-1]
    assert last["loss"] < 0.6 * first["loss"] and last["nmse"] < 0.6 * first["nmse"]
    assert last["explained_variance"] > 0.6 and last["l0"] <= 4
    assert last["step"] == 64 and last["tokens"] == 64 * 256
    window = trainer.pop_window()[0]
    assert window["window_steps"] == 64
    assert window["loss"] == pytest.approx(sum(h["loss"] for h in history) / 64)


def test_encoder_scale_init_is_the_least_squares_optimum():
    """The fitted scale s minimises ||x - b_pre - s * x0||^2: any other scale reconstructs the sample worse."""
    X = toy_tokens(2048, seed=3)
    sae = TopKSAE(SAEConfig(d=16, C=64, k=4), seed=0)
    sae.init_b_pre(X)

    def err(model):
        with torch.no_grad():
            return float((X - model(X).x_hat).pow(2).sum())

    base = copy.deepcopy(sae)
    s = sae.init_encoder_scale(X)
    assert 0 < s < 1  # unit-norm encoder rows overshoot: k projections add up
    for other in (0.8 * s, 1.25 * s, 1.0):
        probe = copy.deepcopy(base)
        with torch.no_grad():
            probe.W_enc.mul_(other)
        assert err(sae) <= err(probe) + 1e-6


@pytest.mark.parametrize("auxk", [True, False])
def test_auxk_revives_planted_dead_latents(auxk):
    """Half the latents are planted dead: zero encoder rows and a tiny positive bias, so they never win the
    TopK but do have (tiny) positive pre-activations. Only AuxK gives them gradient; without it they stay dead.
    (A very negative bias would not do: ReLU zeroes their AuxK values too, as in Gao et al. and sparsify.)"""
    X = toy_tokens(40000)
    cfg = SAEConfig(d=16, C=64, k=4, auxk=auxk, dead_tokens=512, init_b_pre="mean")
    trainer = MultiSAETrainer([cfg], TrainConfig(lr=3e-3))
    trainer.init_from_sample(X[:4096])
    with torch.no_grad():
        trainer.saes[0].W_enc[32:] = 0
        trainer.saes[0].b_enc[32:] = 1e-3
    dead = [trainer.step(X[s * 256:(s + 1) * 256])[0]["dead_fraction"] for s in range(100)]
    assert max(dead[:10]) == 0.5  # the planted half is detected as dead after 512 tokens
    if auxk:
        assert dead[-1] <= 0.25 and trainer.trackers[0].dead_fraction() <= 0.25
    else:
        assert dead[-1] == 0.5 and trainer.trackers[0].dead_fraction() == 0.5


def test_nonfinite_loss_raises_and_leaves_weights_untouched():
    X = toy_tokens(1024)
    trainer = MultiSAETrainer([SAEConfig(d=16, C=32, k=4), SAEConfig(d=16, C=32, k=4, sparsifier="batchtopk")])
    trainer.init_from_sample(X)
    trainer.step(X[:256])
    before = [{k: v.clone() for k, v in sae.state_dict().items()} for sae in trainer.saes]
    adam = [{k: v.clone() for k, v in opt.state_dict()["state"][1].items()} for opt in trainer.optimizers]
    bad = X[256:512].clone()
    bad[3, 5] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"SAE 0 \(topk-C32-k4\).*step 2"):
        trainer.step(bad)
    for sae, state in zip(trainer.saes, before):
        for k, v in sae.state_dict().items():
            assert torch.equal(v, state[k]), k
    for opt, state in zip(trainer.optimizers, adam):
        assert all(torch.equal(v, state[k]) for k, v in opt.state_dict()["state"][1].items())
    assert trainer.steps == [1, 1] and trainer.trackers[0].tokens_seen == 256
    trainer.step(X[512:768])  # training continues normally afterwards
    assert trainer.steps == [2, 2]


def test_step_requires_init_from_sample():
    trainer = MultiSAETrainer([SAEConfig(d=16, C=32, k=4)])
    with pytest.raises(RuntimeError, match="init_from_sample"):
        trainer.step(torch.randn(8, 16))


def test_trainer_forwards_through_wrapped_module():
    calls = []

    class Wrapper(torch.nn.Module):  # stands in for DDP / ray.train.torch.prepare_model
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args):
            calls.append(1)
            return self.module(*args)

    X = toy_tokens(1024)
    trainer = MultiSAETrainer([SAEConfig(d=16, C=32, k=4)], wrap=Wrapper)
    trainer.init_from_sample(X)
    assert calls == [] and trainer._wrapped is None  # applied lazily, after initialisation
    trainer.wrap(Wrapper)  # (or set after construction)
    w0 = trainer.saes[0].W_enc.detach().clone()
    m = trainer.step(X[:256], world_size=4)[0]
    assert calls == [1] and isinstance(trainer.wrapped_module, Wrapper)
    assert m["tokens"] == 1024 and trainer.trackers[0].tokens_seen == 1024  # global token clock
    assert not torch.equal(w0, trainer.saes[0].W_enc)


def test_ddp_world_size_one(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("no gloo")
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        X = toy_tokens(1024)
        trainer = MultiSAETrainer([SAEConfig(d=16, C=32, k=4), SAEConfig(d=16, C=64, k=8, sparsifier="batchtopk")],
                                  TrainConfig(dead_tokens=64), wrap=DDP)  # DDP default: every parameter must get a grad
        trainer.init_from_sample(X)
        for s in range(3):
            metrics = trainer.step(X[s * 256:(s + 1) * 256])
        assert all(m["step"] == 3 for m in metrics)
        bad = X[:256].clone()
        bad[0, 0] = float("inf")
        with pytest.raises(NonFiniteLossError):
            trainer.step(bad)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- trackers
def test_trackers_of_two_workers_combine_to_one_tracker():
    C, steps, n = 40, 12, 16
    g = torch.Generator().manual_seed(0)
    single = DeadLatentTracker(C, dead_tokens=64)
    workers = [DeadLatentTracker(C, dead_tokens=64) for _ in range(2)]
    online = [DeadLatentTracker(C, dead_tokens=64) for _ in range(2)]
    for _ in range(steps):
        # latents 0..9 fire often, 10..29 rarely, 30..39 never
        codes = []
        for _ in range(2):
            idx = torch.where(torch.rand(n, 3, generator=g) < 0.9, torch.randint(0, 10, (n, 3), generator=g),
                              torch.randint(10, 30, (n, 3), generator=g))
            val = torch.rand(n, 3, generator=g) * (torch.rand(n, 3, generator=g) > 0.2)  # some zero values
            codes.append((idx, val))
        single.update(torch.cat([c[0] for c in codes]), torch.cat([c[1] for c in codes]), n_tokens=2 * n)
        for tracker, (idx, val) in zip(workers, codes):
            tracker.update(idx, val, n_tokens=2 * n)  # global clock, local firing
        masks = [torch.zeros(C, dtype=torch.bool).index_fill_(0, i[v > 0], True) for i, v in codes]
        for w, (tracker, (idx, val)) in enumerate(zip(online, codes)):
            tracker.update(idx, val, n_tokens=2 * n, fired_reduce=lambda m, other=masks[1 - w]: m | other)
    merged = DeadLatentTracker.merge(workers)
    assert torch.equal(merged.tokens_since_fired, single.tokens_since_fired)
    assert torch.equal(merged.fire_counts, single.fire_counts)
    assert (merged.tokens_seen, merged.tokens_observed) == (single.tokens_seen, single.tokens_observed) == (steps * 2 * n,) * 2
    assert torch.equal(merged.dead_mask(), single.dead_mask()) and merged.dead_mask()[30:].all()
    assert 0 < single.dead_fraction() < 1 and single.dead_fraction(10**9) == 0
    assert torch.equal(workers[0].merge(workers[1]).tokens_since_fired, single.tokens_since_fired)  # instance form
    for tracker in online:  # with fired_reduce every worker holds the global state after every step
        assert torch.equal(tracker.tokens_since_fired, single.tokens_since_fired)
    # clock alignment: a tracker that stopped earlier is treated as silent since then
    late = DeadLatentTracker(4)
    late.update(torch.tensor([[0], [1]]), torch.ones(2, 1), n_tokens=10)
    early = DeadLatentTracker(4)
    early.update(torch.tensor([[2]]), torch.ones(1, 1), n_tokens=10)
    late.update(torch.tensor([[3]]), torch.ones(1, 1), n_tokens=10)
    assert DeadLatentTracker.merge(late, early).tokens_since_fired.tolist() == [10, 10, 10, 0]
    state = merged.state_dict()
    restored = DeadLatentTracker(C, dead_tokens=64)
    restored.load_state_dict(state)
    assert torch.equal(restored.tokens_since_fired, merged.tokens_since_fired) and restored.tokens_seen == merged.tokens_seen


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_known_answers():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 4.0]])
    assert nmse(x, x).item() == 0.0
    assert nmse(x, x.mean(0).expand_as(x)).item() == pytest.approx(1.0)
    assert explained_variance(x, x + 5.0).item() == pytest.approx(1.0)  # constant offset: variance explained
    assert nmse(x, x + 5.0).item() > 1.0
    assert l0(torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])).item() == pytest.approx(1.5)
    png = firing_frequency_histogram_png(torch.tensor([0, 0, 5, 50, 500, 5000]), tokens=10_000)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert firing_frequency_histogram_png(torch.zeros(4, dtype=torch.long), tokens=10)[:4] == b"\x89PNG"


# -------------------------------------------------------------------------------------------- persistence
def test_sae_save_load_bytes_round_trip(tmp_path):
    cfg = SAEConfig(d=12, C=40, k=5, sparsifier="batchtopk")
    sae = perturbed_sae(cfg, dtype=torch.float32)
    sae.preprocessing = Preprocessing(scale=0.25)
    sae.threshold.fill_(0.5)
    sae.eval()
    x = torch.randn(20, 12)
    ref = sae.encode(x)
    sae.save(tmp_path / "m.safetensors")
    for other in (TopKSAE.load(tmp_path / "m.safetensors"), TopKSAE.from_bytes(sae.to_bytes())):
        other.eval()
        assert other.config == cfg and other.preprocessing == sae.preprocessing
        got = other.encode(x)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    with pytest.raises(SAEConfigError, match="k: expected 6, found 5"):
        TopKSAE.from_bytes(sae.to_bytes(), config=SAEConfig(d=12, C=40, k=6, sparsifier="batchtopk"))
    with pytest.raises(SAEConfigError, match="k: expected 4, found 5"):
        TopKSAE(SAEConfig(d=12, C=40, k=4, sparsifier="batchtopk")).load_weights(tmp_path / "m.safetensors")
    with pytest.raises(SAEConfigError, match="C=40"):
        TopKSAE(SAEConfig(d=12, C=48, k=5)).load_state_dict(sae.state_dict())


def test_checkpoint_round_trip_and_deterministic_resume(tmp_path):
    X = toy_tokens(4096, seed=2)
    configs = [SAEConfig(d=16, C=64, k=4, dead_tokens=256), SAEConfig(d=16, C=32, k=3, sparsifier="batchtopk")]
    train = TrainConfig(lr=3e-3, dead_tokens=256)
    batches = [X[s * 128:(s + 1) * 128] for s in range(12)]

    a = MultiSAETrainer(configs, train)
    a.init_from_sample(X[:2048])
    for b in batches[:6]:
        a.step(b)
    save_checkpoint(a, tmp_path / "ckpt")
    a.generator.manual_seed(123)  # must be restored by the load below
    tail_a = [a.step(b) for b in batches[6:]]

    b_ = MultiSAETrainer(configs, train)
    assert load_checkpoint(tmp_path / "ckpt", b_) is b_
    assert b_.steps == [6, 6] and b_.preprocessing == load_checkpoint(tmp_path / "ckpt").preprocessing
    tail_b = [b_.step(b) for b in batches[6:]]
    assert tail_a == tail_b  # identical metrics, step by step
    for sa, sb in zip(a.saes, b_.saes):
        for k, v in sa.state_dict().items():
            assert torch.equal(v, sb.state_dict()[k]), k
    for ta, tb in zip(a.trackers, b_.trackers):
        assert torch.equal(ta.tokens_since_fired, tb.tokens_since_fired) and torch.equal(ta.fire_counts, tb.fire_counts)
    assert torch.equal(b_.generator.get_state(), torch.Generator().manual_seed(train.seed).get_state())

    with pytest.raises(SAEConfigError, match=r"SAE 1 .*C: expected 48, found 32"):
        load_checkpoint(tmp_path / "ckpt", MultiSAETrainer([configs[0], SAEConfig(d=16, C=48, k=3, sparsifier="batchtopk")], train))
    with pytest.raises(SAEConfigError, match=r"checkpoint has 2 SAEs .*trainer has 1"):
        load_checkpoint(tmp_path / "ckpt", MultiSAETrainer(configs[:1], train))
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["sae_000.safetensors", "sae_001.safetensors", "state.safetensors", "trainer.json"]
    assert TopKSAE.load(tmp_path / "ckpt" / "sae_000.safetensors").config == configs[0]
