"""Stage 1 on Ray Train: a (C, k) grid in one pass, DDP over two workers, streamed data, checkpoints that a
killed run resumes from, registration in sae_models, and the bad inputs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from spg_dist.errors import NoTokensError
from spg_dist.ray.train_sae import train_saes
from spg_dist.sae import NonFiniteLossError, SAEConfigError, TopKSAE
from spg_dist.store import Store, load_schema, tokens_to_arrow, write_fragment
from spg_dist.store.sae_models import get as sae_row

pytestmark = pytest.mark.ray
D = 16


def make_token_store(path, n_images=64, grid=4, d=D, seed=0, nan_image=None, backbone="bb", layer=3):
    """Tokens with sparse structure (a few of 48 directions per token), so a small SAE has something to learn."""
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((48, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    n_tok = n_images * grid * grid
    z = np.zeros((n_tok, 48))
    for i in range(n_tok):
        z[i, rng.choice(48, 3, replace=False)] = rng.uniform(0.5, 2.0, 3)
    toks = (z @ atoms + 0.01 * rng.standard_normal((n_tok, d))).reshape(n_images, grid, grid, d)
    if nan_image is not None:
        toks[nan_image] = np.nan
    ids = [f"ds/cat{i % 2}/train/good/{i:03d}" for i in range(n_images)]
    meta = dict(backbone=[backbone] * n_images, layer=[layer] * n_images, image_id=ids, dataset=["ds"] * n_images,
                category=[f"cat{i % 2}" for i in range(n_images)], split=["train"] * n_images,
                label=[0] * n_images, image_size=[64] * n_images)
    store = Store(path)
    store.commit_fragments("patch_tokens", write_fragment(store.lance_uri("patch_tokens"),
                                                          tokens_to_arrow(meta, toks, "random-init"),
                                                          load_schema("patch_tokens")))
    return store


@pytest.fixture(scope="module")
def token_store(tmp_path_factory):
    return make_token_store(tmp_path_factory.mktemp("tok") / "store")


def test_grid_in_one_pass_registers_every_sae(ray_cluster, token_store):
    rows = train_saes(token_store, "bb", Cs=[32, 64], ks=[2, 4], batch_tokens=128, epochs=2, log_every=4,
                      checkpoint_every=8, run_name="grid").models
    assert sorted((r["C"], r["k"]) for r in rows) == [(32, 2), (32, 4), (64, 2), (64, 4)]
    assert len({r["steps"] for r in rows}) == 1 and rows[0]["steps"] == 2 * (64 * 16 // 128)
    for r in rows:
        full = sae_row(token_store, r["sae_id"])
        sae = TopKSAE.from_bytes(full["weights"])
        assert (sae.config.C, sae.config.k) == (full["C"], full["k"])
        norms = sae.W_dec.norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-4, rtol=0)
        assert 0 < full["nmse"] < 1.0 and full["l0"] <= full["k"] + 1e-6
        assert full["firing_histogram_png"][:8] == b"\x89PNG\r\n\x1a\n"
        curve = json.loads(full["metrics"])["curve"]
        assert curve[-1]["step"] == full["steps"] and curve[0]["nmse"] > curve[-1]["nmse"]


def test_two_workers_ddp(ray_cluster, token_store):
    rows = train_saes(token_store, "bb", Cs=[32], ks=[4], batch_tokens=128, epochs=1, workers=2,
                      cpus_per_worker=0.5, run_name="ddp").models
    assert rows[0]["steps"] == min(_per_worker_tokens(token_store, 2)) // 64
    assert json.loads(sae_row(token_store, rows[0]["sae_id"])["config"])["workers"] == 2


def test_streamed_data_with_per_image_preprocessing(ray_cluster, token_store):
    """The stream path applies per-image steps inside the Ray Data read, before tokens are split up and
    shuffled; the fitted steps are recorded with the SAE, whose d grows by the appended constant."""
    streamed = train_saes(token_store, "bb", Cs=[32], ks=[4], batch_tokens=128, epochs=1, data_mode="stream",
                          cpus_per_worker=0.5, run_name="stream", preprocess="center,constant").models
    assert streamed[0]["steps"] == 64 * 16 // 128
    full = sae_row(token_store, streamed[0]["sae_id"])
    config = json.loads(full["config"])
    assert config["data_mode"] == "stream"
    assert config["preprocessing"]["center"] and config["preprocessing"]["constant"] > 0
    sae = TopKSAE.from_bytes(full["weights"])
    assert sae.d == full["d"] == sae.raw_dim + 1
    assert 0 < full["nmse"] < 1.0


def test_bad_inputs_fail_before_training(ray_cluster, token_store):
    with pytest.raises(SAEConfigError, match="k"):
        train_saes(token_store, "bb", Cs=[8], ks=[8])
    with pytest.raises(SAEConfigError):
        train_saes(token_store, "bb", Cs=[8], ks=[0])
    with pytest.raises(NoTokensError, match="the store holds bb layer 3"):
        train_saes(token_store, "other-backbone", Cs=[32], ks=[4])
    with pytest.raises(NoTokensError, match="bb layer 3"):
        train_saes(token_store, "bb", layer=7, Cs=[32], ks=[4])


def test_checkpoint_of_another_config_is_refused(token_store):
    """A run directory holding a checkpoint of other SAEs (a reused --run-name) is refused in one line before
    Ray starts."""
    from spg_dist.sae import MultiSAETrainer, SAEConfig, TrainConfig, save_checkpoint

    other = MultiSAETrainer([SAEConfig(d=D, C=64, k=8)], TrainConfig())
    save_checkpoint(other, os.path.join(token_store.uri, "_runs", "reused", "checkpoint_000000"))
    with pytest.raises(SAEConfigError, match="another configuration.*C: expected 32, found 64"):
        train_saes(token_store, "bb", Cs=[32], ks=[4], batch_tokens=128, run_name="reused")


def test_nonfinite_loss_stops_with_last_good_checkpoint(ray_cluster, tmp_path):
    store = make_token_store(tmp_path / "s", n_images=16, nan_image=15)
    with pytest.raises(NonFiniteLossError, match="checkpoint"):
        train_saes(store, "bb", Cs=[32], ks=[4], batch_tokens=16, epochs=1, checkpoint_every=2, run_name="nan")
    assert store.count("sae_models") == 0


def test_killed_worker_is_recovered_from_its_checkpoint(ray_cluster, tmp_path):
    """Ray Train's FailureConfig: a worker SIGKILLed at step 10 is restarted from its latest checkpoint."""
    store = make_token_store(tmp_path / "s")
    rows = train_saes(store, "bb", Cs=[32], ks=[4], batch_tokens=64, epochs=1, checkpoint_every=4, log_every=4,
                      run_name="recover", max_failures=1, _fault_at_step=10).models
    assert rows[0]["steps"] == 64 * 16 // 64
    assert json.loads(sae_row(store, rows[0]["sae_id"])["config"])["resumed_from_step"] in (4, 8)


def test_rerun_after_a_failed_run_resumes(ray_cluster, tmp_path):
    """The run dies (no retries left); the same command run again resumes from its latest checkpoint and ends
    at the same step count as an uninterrupted run."""
    store = make_token_store(tmp_path / "s")
    kwargs = dict(Cs=[32], ks=[4], batch_tokens=64, epochs=1, checkpoint_every=4, log_every=4)
    with pytest.raises(Exception):
        train_saes(store, "bb", run_name="rerun", _fault_at_step=10, **kwargs)
    assert store.count("sae_models") == 0
    rows = train_saes(store, "bb", run_name="rerun", **kwargs).models
    assert rows[0]["steps"] == 64 * 16 // 64
    assert json.loads(sae_row(store, rows[0]["sae_id"])["config"])["resumed_from_step"] in (4, 8)


def _per_worker_tokens(store, world):
    from spg_dist.ray.sae_data import owner

    ids = store.read("patch_tokens", columns=["image_id"]).column("image_id").to_pylist()
    return [16 * sum(owner(i, world) == r for i in ids) for r in range(world)]
