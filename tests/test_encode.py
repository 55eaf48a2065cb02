"""spg encode: codes for every stored token through a Ray Data actor pool, into sae_codes, atom_index (indexed)
and atom_top; atom_top/atom_index top-k equal a brute-force top-k over sae_codes; re-runs add nothing."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from spg_dist.cli import main
from spg_dist.errors import NoTokensError
from spg_dist.ray.encode import encode
from spg_dist.sae import SAEConfig, TopKSAE
from spg_dist.store import Store, load_tokens
from spg_dist.store.atoms import brute_force_top, top_patches

from test_train_sae import make_token_store

pytestmark = pytest.mark.ray


def register_sae(store: Store, d: int = 16, C: int = 32, k: int = 4, sae_id: str = "bb/L3/test") -> TopKSAE:
    """An SAE initialised from the stored tokens (no training needed to test encoding)."""
    sae = TopKSAE(SAEConfig(d=d, C=C, k=k), seed=0)
    _, toks = load_tokens(store, "bb", 3)
    sae.init_b_pre(torch.from_numpy(toks.reshape(-1, d)).float())
    store.upsert("sae_models", [dict(
        sae_id=sae_id, backbone="bb", layer=3, d=d, C=C, k=k, sparsifier="topk", run="test",
        config=json.dumps({"sae": sae.config.to_dict()}), metrics="{}", nmse=1.0, explained_variance=0.0, l0=k,
        dead_fraction=0.0, steps=0, tokens_seen=0, weights=sae.to_bytes(), firing_histogram_png=b"",
        run_dir="", created_at=dt.datetime(2026, 1, 1))])
    return sae


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, ray_cluster):
    store = make_token_store(tmp_path_factory.mktemp("enc") / "store", n_images=24)
    sae = register_sae(store)
    res = encode(store, "bb/L3/test", top_n=6, batch_size=4, progress=False)
    return store, sae, res


def test_codes_match_the_model(encoded):
    store, sae, res = encoded
    assert res.images_encoded == 24 == store.count("sae_codes")
    meta, toks = load_tokens(store, "bb", 3)
    values, indices = sae.encode(torch.from_numpy(toks.reshape(-1, 16)).float())
    codes = store.read("sae_codes").to_pandas().set_index("image_id").loc[meta.column("image_id").to_pylist()]
    got_idx = np.concatenate(codes["indices"].map(np.asarray).to_list()).reshape(-1, 4)
    got_val = np.concatenate(codes["values"].map(np.asarray).to_list()).reshape(-1, 4)
    np.testing.assert_array_equal(got_idx, indices.numpy())
    np.testing.assert_allclose(got_val, values.detach().numpy(), rtol=1e-6)
    assert store.count("atom_index") == int((values > 0).sum()) == res.atom_rows


def test_atom_top_and_index_equal_brute_force(encoded):
    store, _, _ = encoded
    for atom in range(32):
        for n in (1, 6):
            ref = brute_force_top(store, "bb/L3/test", atom, n)
            got = top_patches(store, "bb/L3/test", atom, n)
            assert got.select(["image_id", "patch", "value"]).equals(ref.select(["image_id", "patch", "value"]))
        ref = brute_force_top(store, "bb/L3/test", atom, 5, category="cat1")
        got = top_patches(store, "bb/L3/test", atom, 5, category="cat1")
        assert got.select(["image_id", "patch", "value"]).equals(ref.select(["image_id", "patch", "value"]))
    idx = store.table("atom_index").to_lance().list_indices()
    assert any("atom" in i["fields"] for i in idx)


def test_rerun_is_idempotent_and_resumes_partial(encoded, tmp_path):
    store, _, _ = encoded
    n_idx, n_top = store.count("atom_index"), store.count("atom_top")
    again = encode(store, "bb/L3/test", top_n=6, progress=False)
    assert again.images_encoded == 0 and again.images_skipped == 24
    assert store.count("atom_index") == n_idx and store.count("atom_top") == n_top
    # a crash after the atom_index commit but before the sae_codes commit: codes of two images missing
    store.table("sae_codes").delete("image_id IN ('ds/cat0/train/good/000', 'ds/cat1/train/good/001')")
    res = encode(store, "bb/L3/test", top_n=6, progress=False)
    assert res.images_encoded == 2 and store.count("sae_codes") == 24
    assert store.count("atom_index") == n_idx and store.count("atom_top") == n_top
    for atom in (0, 5, 17):
        assert top_patches(store, "bb/L3/test", atom, 6).select(["image_id", "patch", "value"]).equals(
            brute_force_top(store, "bb/L3/test", atom, 6).select(["image_id", "patch", "value"]))


def test_cli_atoms_top_and_stats(encoded, tmp_path):
    store, _, _ = encoded
    runner = CliRunner()
    r = runner.invoke(main, ["atoms", "top", "--store", store.uri, "--sae", "bb/L3/test", "--atom", "3", "-n", "4",
                             "--verify"])
    assert r.exit_code == 0, r.output
    assert "equal to the brute-force" in r.output
    r = runner.invoke(main, ["atoms", "stats", "--store", store.uri, "--sae", "bb/L3/test",
                             "--png", str(tmp_path / "s.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    r = runner.invoke(main, ["atoms", "top", "--store", store.uri, "--sae", "nope", "--atom", "3"])
    assert r.exit_code == 1 and "Traceback" not in r.output


def test_dimension_mismatch_is_one_clear_error(ray_cluster, tmp_path):
    store = make_token_store(tmp_path / "s", n_images=4)
    sae = TopKSAE(SAEConfig(d=8, C=16, k=2), seed=0)
    store.upsert("sae_models", [dict(
        sae_id="bb/L3/d8", backbone="bb", layer=3, d=8, C=16, k=2, sparsifier="topk", run="t", config="{}",
        metrics="{}", nmse=1.0, explained_variance=0.0, l0=2.0, dead_fraction=0.0, steps=0, tokens_seen=0,
        weights=sae.to_bytes(), firing_histogram_png=b"", run_dir="", created_at=dt.datetime(2026, 1, 1))])
    with pytest.raises(NoTokensError, match="dim 8"):
        encode(store, "bb/L3/d8", progress=False)
