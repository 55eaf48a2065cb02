"""spg encode: codes for every stored token through a Ray Data actor pool into sae_codes (each key once), then
atom_images and atom_top built from all of them; top-k queries equal a brute-force top-k over sae_codes; re-runs add
nothing; an encode killed after its first commit and re-run, or racing another encode of the same SAE, leaves the
atom tables equal to a fresh build over all of sae_codes."""

from __future__ import annotations

import datetime as dt
import json
import threading

import numpy as np
import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner

from spg_dist.cli import main
from spg_dist.errors import NoTokensError
from spg_dist.ray.encode import SAEEncodeActor, encode, write_codes_batch
from spg_dist.sae import SAEConfig, TopKSAE
from spg_dist.store import Store, codes, load_tokens, sae_models
from spg_dist.store.atoms import AtomQueryError, brute_force_top, images_firing, top_patches

from test_train_sae import make_token_store

pytestmark = pytest.mark.ray
SAE = "bb/L3/test"


def register_sae(store: Store, d: int = 16, C: int = 32, k: int = 4, sae_id: str = SAE) -> TopKSAE:
    """An SAE initialised from the stored tokens (no training needed to test encoding); same seed, same SAE."""
    sae = TopKSAE(SAEConfig(d=d, C=C, k=k), seed=0)
    _, toks = load_tokens(store, "bb", 3)
    sae.init_b_pre(torch.from_numpy(toks.reshape(-1, d)).float())
    store.upsert("sae_models", [dict(
        sae_id=sae_id, backbone="bb", layer=3, d=d, C=C, k=k, sparsifier="topk", run="test",
        config=json.dumps({"sae": sae.config.to_dict()}), metrics="{}", nmse=1.0, explained_variance=0.0, l0=k,
        dead_fraction=0.0, steps=0, tokens_seen=0, weights=sae.to_bytes(), firing_histogram_png=b"",
        run_dir="", created_at=dt.datetime(2026, 1, 1))])
    return sae


def derived(store: Store, sae_id: str) -> tuple[pa.Table, pa.Table]:
    """The SAE's atom_top and atom_images rows in key order, without sae_id (to compare two SAEs' builds)."""
    top = store.read("atom_top", f"sae_id = '{sae_id}'").drop_columns(["sae_id"])
    img = store.read("atom_images", f"sae_id = '{sae_id}'").drop_columns(["sae_id"])
    return (top.sort_by([("scope", "ascending"), ("atom", "ascending"), ("rank", "ascending")]),
            img.sort_by([("atom", "ascending"), ("image_id", "ascending")]))


def assert_fresh_build(store: Store, sae_id: str, tmp_path) -> None:
    """The SAE's atom tables equal a from-scratch build over its sae_codes, copied into a new store at once."""
    fresh = Store(tmp_path / "fresh")
    fresh.upsert("sae_codes", store.read("sae_codes", f"sae_id = '{sae_id}'"))
    codes.build_atoms(fresh, sae_id, top_n=6, index=False)
    got, want = derived(store, sae_id), derived(fresh, sae_id)
    assert got[0].num_rows and got[1].num_rows
    assert got[0].equals(want[0]) and got[1].equals(want[1])


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, ray_cluster):
    store = make_token_store(tmp_path_factory.mktemp("enc") / "store", n_images=24)
    sae = register_sae(store)
    res = encode(store, SAE, top_n=6, batch_size=4, progress=False)
    return store, sae, res


def test_codes_match_the_model(encoded):
    store, sae, res = encoded
    assert res.images_encoded == 24 == store.count("sae_codes")
    meta, toks = load_tokens(store, "bb", 3)
    values, indices = sae.encode(torch.from_numpy(toks.reshape(-1, 16)).float())
    rows = store.read("sae_codes").to_pandas().set_index("image_id").loc[meta.column("image_id").to_pylist()]
    got_idx = np.concatenate(rows["indices"].map(np.asarray).to_list()).reshape(-1, 4)
    got_val = np.concatenate(rows["values"].map(np.asarray).to_list()).reshape(-1, 4)
    np.testing.assert_array_equal(got_idx, indices.numpy())
    np.testing.assert_allclose(got_val, values.detach().numpy(), rtol=1e-6)
    v, i = values.detach().numpy().reshape(24, -1, 4), indices.numpy().reshape(24, -1, 4)
    assert res.activations == int((v > 0).sum())
    pairs = {(img, a) for img in range(24) for a in np.unique(i[img][v[img] > 0])}
    assert store.count("atom_images") == len(pairs) == res.build.atom_images_rows
    assert res.build.rebuilt == ("atom_images", "atom_top") and res.build.images == 24


def test_atom_tables_equal_brute_force(encoded):
    store, _, _ = encoded
    for atom in range(32):
        for n in (1, 6, 9):                                          # 9 > top_n: the exact path via atom_images
            for cat in (None, "cat1"):
                ref = brute_force_top(store, SAE, atom, n, category=cat)
                got = top_patches(store, SAE, atom, n, category=cat)
                assert got.equals(ref), (atom, n, cat)
    fires = images_firing(store, SAE, 3)
    assert fires.column("count").to_pylist() and sum(fires.column("count").to_pylist()) == \
        brute_force_top(store, SAE, 3, 10_000).num_rows
    for table in ("atom_top", "atom_images"):
        assert any("atom" in i["fields"] for i in store.table(table).to_lance().list_indices())


def test_rerun_is_idempotent(encoded):
    store, _, _ = encoded
    counts = {t: store.count(t) for t in ("sae_codes", "atom_images", "atom_top")}
    versions = {t: store.lance(t).version for t in ("atom_images", "atom_top")}
    again = encode(store, SAE, top_n=6, progress=False)
    assert again.images_encoded == 0 and again.images_skipped == 24 and again.build.rebuilt == ()
    assert {t: store.count(t) for t in counts} == counts
    assert {t: store.lance(t).version for t in versions} == versions       # nothing rewritten


def local_codes(store: Store, sae_id: str) -> pa.Table:
    """sae_codes rows of every stored image, computed in this process by the encode actor's code (no Ray)."""
    toks = store.read("patch_tokens", columns=["image_id", "dataset", "category", "split", "label", "grid_h",
                                                  "grid_w", "dim", "tokens"]).sort_by("image_id")
    return SAEEncodeActor(sae_models.get(store, sae_id)["weights"], sae_id)(toks)


def commit_window(store: Store, rows: pa.Table) -> None:
    """What an encode's driver does with one window: the writer task's fragment, committed exactly once."""
    info = json.loads(write_codes_batch(rows, codes.lance_uri(store)).column("info")[0].as_py())
    codes.commit(store, info["fragments"])


def test_encode_killed_after_first_commit_then_rerun(encoded, tmp_path):
    """The issue's case: an encode killed after its first commit (its first window of codes committed, no atom
    tables built), then re-run: it encodes the remaining images and the atom tables equal a fresh build over all
    of sae_codes (the old design's atom_top missed the first window's entries)."""
    store, _, _ = encoded
    sid = "bb/L3/killed"
    register_sae(store, sae_id=sid)
    commit_window(store, local_codes(store, sid).slice(0, 8))
    with pytest.raises(AtomQueryError, match="atom_top has no rows for SAE 'bb/L3/killed'"):
        top_patches(store, sid, 0)
    res = encode(store, sid, top_n=6, batch_size=4, progress=False)
    assert res.images_encoded == 16 and res.images_skipped == 8
    assert res.build.images == 24 and res.build.rebuilt == ("atom_images", "atom_top")
    assert_fresh_build(store, sid, tmp_path)
    for atom in (0, 5, 17):
        for cat in (None, "cat0"):
            assert top_patches(store, sid, atom, 6, cat).equals(brute_force_top(store, sid, atom, 6, cat))


def test_racing_encodes_of_one_sae(encoded, tmp_path):
    """A second encode of the same SAE (its driver's work: the encode writer's fragments over overlapping windows,
    commit, build) runs in another thread, started when the first has made its first commit; every key is stored
    once and the atom tables equal a fresh build over all of sae_codes."""
    store, _, _ = encoded
    sid = "bb/L3/race"
    register_sae(store, sae_id=sid)
    rows = local_codes(store, sid)
    errors, threads = [], []

    def other_encode():
        try:
            for part in (rows.slice(0, 14), rows.slice(6)):
                commit_window(store, part)
                codes.build_atoms(store, sid, top_n=6)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def start_other(stage):
        if not threads:
            threads.append(threading.Thread(target=other_encode))
            threads[0].start()

    encode(store, sid, top_n=6, batch_size=4, commit_every_s=0, progress=False, hook=start_other)
    threads[0].join()
    assert not errors, errors
    keys = store.read("sae_codes", f"sae_id = '{sid}'", ["image_id"]).column("image_id").to_pylist()
    assert len(keys) == len(set(keys)) == 24
    assert_fresh_build(store, sid, tmp_path)


def test_cli_atoms_top_firing_and_stats(encoded, tmp_path):
    store, _, _ = encoded
    runner = CliRunner()
    for extra in ([], ["--category", "cat0"], ["-n", "9"]):
        r = runner.invoke(main, ["atoms", "top", "--store", store.uri, "--sae", SAE, "--atom", "3", "-n", "4",
                                 "--verify", *extra])
        assert r.exit_code == 0, r.output
        assert "equal to the brute-force" in r.output
    r = runner.invoke(main, ["atoms", "firing", "--store", store.uri, "--sae", SAE, "--atom", "3"])
    assert r.exit_code == 0 and "firings" in r.output, r.output
    r = runner.invoke(main, ["atoms", "stats", "--store", store.uri, "--sae", SAE, "--png", str(tmp_path / "s.png")])
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
