"""Atom queries and pictures on a hand-built store whose codes are planted, so every answer is known."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from spg_dist.store import Store, StoreError
from spg_dist.store.atoms import (AtomQueryError, activation_maps, atom_activation_map, atom_stats,
                                  brute_force_top, ensure_atom_indexes, top_patches)
from spg_dist.viz import atom_gallery_png, atom_stats_png, upsample_bilinear

GH, GW, K, C, N_TOP = 4, 4, 3, 16, 5
CATS = ("bottle", "cable", "grid")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sae_model(sae_id: str, c: int) -> dict:
    return dict(sae_id=sae_id, backbone="bb", layer=1, d=8, C=c, k=K, sparsifier="topk", run="r", config="{}",
                metrics="{}", nmse=0.1, explained_variance=0.9, l0=float(K), dead_fraction=0.0, steps=1,
                tokens_seen=1, weights=b"", firing_histogram_png=b"", run_dir="/tmp",
                created_at=dt.datetime(2025, 1, 1))


def _write_codes(store: Store, tmp_path, sae_id: str, images: list[tuple[str, str, int]],
                 codes: dict[str, tuple[np.ndarray, np.ndarray]], gh: int, gw: int, k: int) -> None:
    """images (image_id, category, label) with a PNG each, their sae_codes rows and atom_index rows."""
    img_rows, code_rows, index_rows = [], [], []
    rng = np.random.default_rng(1)
    for iid, cat, label in images:
        path = tmp_path / (iid.replace("/", "_") + ".png")
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
        img_rows.append(dict(image_id=iid, dataset="d", category=cat, split="test", label=label,
                             defect_type="good" if label == 0 else "bad", image_uri=str(path), mask_uri="",
                             width=40, height=30))
        idx, val = codes[iid]
        code_rows.append(dict(sae_id=sae_id, image_id=iid, dataset="d", category=cat, split="test", label=label,
                              grid_h=gh, grid_w=gw, k=k, indices=idx.ravel().tolist(), values=val.ravel().tolist()))
        for p, j in zip(*np.nonzero(val > 0)):
            index_rows.append(dict(sae_id=sae_id, atom=int(idx[p, j]), image_id=iid, category=cat, split="test",
                                   label=label, patch=int(p), value=float(val[p, j])))
    store.upsert("images", img_rows)
    store.upsert("sae_codes", code_rows)
    store.upsert("atom_index", index_rows)


def _reference_top(codes, cats, atom, n, category=None) -> list[tuple[str, int, float]]:
    """Independent top-n from the planted arrays: (image_id, patch, value), value desc then id, patch."""
    hits = [(iid, int(p), float(val[p, j])) for iid, (idx, val) in codes.items()
            if category is None or cats[iid] == category
            for p, j in zip(*np.nonzero((idx == atom) & (val > 0)))]
    return sorted(hits, key=lambda h: (-h[2], h[0], h[1]))[:n]


def _triples(t: pa.Table) -> list[tuple[str, int, float]]:
    return [(r["image_id"], r["patch"], pytest.approx(r["value"], rel=1e-6)) for r in t.to_pylist()]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("atoms")
    store = Store(tmp / "store")
    rng = np.random.default_rng(0)
    images = [(f"d/{c}/test/{i:03d}", c, i % 2) for c in CATS for i in range(2)]
    codes = {}
    for iid, _, _ in images:
        idx = np.stack([rng.permutation(C)[:K] for _ in range(GH * GW)]).astype(np.int32)
        val = rng.uniform(0.1, 5.0, (GH * GW, K)).astype(np.float32)
        val[rng.random((GH * GW, K)) < 0.15] = 0.0          # BatchTopK padding: an index with value 0
        codes[iid] = (idx, val)
    _write_codes(store, tmp, "s1", images, codes, GH, GW, K)
    cats = {iid: c for iid, c, _ in images}
    top_rows = []   # atom_top as encode would materialise it: top N_TOP per atom
    for a in range(C):
        for rank, (iid, p, v) in enumerate(_reference_top(codes, cats, a, N_TOP)):
            top_rows.append(dict(sae_id="s1", atom=a, rank=rank, image_id=iid, category=cats[iid], patch=p,
                                 row=p // GW, col=p % GW, value=v))
    store.upsert("atom_top", top_rows)
    store.upsert("sae_models", [_sae_model("s1", C), _sae_model("s2", 4)])
    # s2: a tiny case computed by hand (grid 2x2, k=2). A holds 4 patches, B 8 (two images).
    z = np.zeros((4, 2), np.float32)
    s2 = {"d/A/0": (np.array([[0, 1], [0, 3], [3, 0], [0, 0]], np.int32),
                    np.array([[1.0, 2.0], [3.0, 0], [0.5, 0], [0, 0]], np.float32)),
          "d/B/0": (np.array([[1, 0], [0, 0], [0, 0], [0, 0]], np.int32), np.array([[2.0, 0], *z[1:]], np.float32)),
          "d/B/1": (np.zeros((4, 2), np.int32), z)}
    _write_codes(store, tmp, "s2", [("d/A/0", "A", 0), ("d/B/0", "B", 1), ("d/B/1", "B", 0)], s2, 2, 2, 2)
    _write_codes(store, tmp, "s3", [("d/A/0", "A", 0), ("d/B/0", "B", 1), ("d/B/1", "B", 0)], s2, 2, 2, 2)
    ensure_atom_indexes(store)
    return store, codes, cats, tmp


@pytest.mark.parametrize("n", [3, N_TOP, 8])
def test_top_patches_match_brute_force_and_planted(planted, n):
    store, codes, cats, _ = planted
    for atom in range(C):
        want = _reference_top(codes, cats, atom, n)
        assert _triples(brute_force_top(store, "s1", atom, n)) == want
        got = top_patches(store, "s1", atom, n)           # atom_top path (n <= N), atom_index fallback (n > N)
        assert _triples(got) == want
        assert got.column("rank").to_pylist() == list(range(len(want)))
        assert got.column("row").to_pylist() == [p // GW for _, p, _ in want]
        assert got.column("col").to_pylist() == [p % GW for _, p, _ in want]
        for cat in CATS:                                    # category path: atom_index filtered
            want_c = _reference_top(codes, cats, atom, n, cat)
            assert _triples(top_patches(store, "s1", atom, n, category=cat)) == want_c
            assert _triples(brute_force_top(store, "s1", atom, n, category=cat)) == want_c
            assert set(top_patches(store, "s1", atom, n, category=cat).column("category").to_pylist()) <= {cat}


def test_activation_maps_equal_planted_codes(planted):
    store, codes, _, _ = planted
    for iid, (idx, val) in codes.items():
        for atom in (0, 5, 15):
            want = ((idx == atom) * val).sum(1).reshape(GH, GW)
            np.testing.assert_allclose(atom_activation_map(store, "s1", iid, atom), want, rtol=1e-6)
    assert set(activation_maps(store, "s1", list(codes), 2)) == set(codes)


def test_atom_stats_on_hand_computed_case(planted):
    store = planted[0]
    df = atom_stats(store, "s2").set_index("atom")
    assert list(df.index) == [0, 1, 2, 3]                       # C from sae_models: atoms 2, 3 are dead
    assert df["count"].tolist() == [2, 2, 0, 1]
    np.testing.assert_allclose(df["frequency"], [2 / 12, 2 / 12, 0, 1 / 12])
    np.testing.assert_allclose(df["mean_activation"], [2.0, 2.0, 0.0, 0.5])
    assert df.loc[0, "category_entropy"] == 0.0 and df.loc[0, "n_categories"] == 1  # only in A
    assert df.loc[0, "top_category"] == "A" and df.loc[0, "top_share"] == 1.0
    # atom 1: mass 2 in A (4 patches) and 2 in B (8 patches): per patch 0.5 vs 0.25 -> p = (2/3, 1/3)
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)) / math.log(2)
    assert df.loc[1, "category_entropy"] == pytest.approx(h) and df.loc[1, "n_categories"] == 2
    assert df.loc[1, "anomalous_share"] == pytest.approx(0.5)   # d/B/0 is labelled anomalous
    assert math.isnan(df.loc[2, "category_entropy"])
    assert df.loc[1, "mass:A"] == 2.0 and df.loc[1, "mass:B"] == 2.0
    raw = atom_stats(store, "s2", per_patch=False).set_index("atom")
    assert raw.loc[1, "category_entropy"] == pytest.approx(1.0)  # equal mass in both categories
    # atom 3 fired once (value 0 entries are padding): in category A, entropy 0
    assert raw.loc[3, "category_entropy"] == 0.0
    unregistered = atom_stats(store, "s3")                       # no sae_models row: C = last firing atom + 1
    assert unregistered["count"].tolist() == [2, 2, 0, 1]
    s1 = atom_stats(store, "s1")
    assert s1["count"].sum() == store.count("atom_index", "sae_id = 's1'")
    assert ((s1["category_entropy"].dropna() >= 0) & (s1["category_entropy"].dropna() <= 1 + 1e-9)).all()


def test_pngs_are_written(planted):
    store, _, _, tmp = planted
    rows = top_patches(store, "s1", 4, 8)
    for size in (None, 32):
        out = atom_gallery_png(store, "s1", 4, rows, tmp / f"png/gallery_{size}.png", image_size=size)
        data = out.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
        assert Image.open(out).size[0] > 600
    empty = atom_gallery_png(store, "s1", 4, rows.slice(0, 0), tmp / "png/empty.png")
    assert empty.read_bytes()[:8] == PNG_MAGIC
    out = atom_stats_png(atom_stats(store, "s1"), tmp / "png/stats.png")
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000


def test_upsample_bilinear():
    m = np.array([[0.0, 1.0], [2.0, 3.0]])
    up = upsample_bilinear(m, 4)
    assert up.shape == (4, 4)
    np.testing.assert_allclose(up[0], [0, 0.25, 0.75, 1])       # half-pixel centres, edges clamped
    np.testing.assert_allclose(upsample_bilinear(np.full((3, 3), 2.0), 7, 5), 2.0)


def test_clear_errors(planted):
    store = planted[0]
    with pytest.raises(AtomQueryError, match=r"no SAE codes for 'nope'.*spg encode.*s1") as e:
        top_patches(store, "nope", 0)
    assert isinstance(e.value, LookupError) and isinstance(e.value, StoreError)
    with pytest.raises(AtomQueryError, match=r"atom 16 out of range.*0\.\.15"):
        top_patches(store, "s1", 16)
    with pytest.raises(AtomQueryError, match=r"unknown category 'zzz'.*known: bottle, cable, grid"):
        top_patches(store, "s1", 0, category="zzz")
    with pytest.raises(AtomQueryError, match="not encoded"):
        atom_activation_map(store, "s1", "d/none", 0)
    with pytest.raises(AtomQueryError, match="spg encode"):
        atom_stats(Store(planted[3] / "empty_store"), "s1")
    store.upsert("sae_codes", [dict(sae_id="s4", image_id="d/A/0", dataset="d", category="A", split="test", label=0,
                                    grid_h=2, grid_w=2, k=1, indices=[0] * 4, values=[1.0] * 4)])
    for query in (lambda: atom_stats(store, "s4"), lambda: top_patches(store, "s4", 0)):
        with pytest.raises(AtomQueryError, match="atom_index has no rows for SAE 's4'"):
            query()


def test_atom_index_is_used_and_kept_fresh(planted):
    store = planted[0]
    for table in ("atom_index", "atom_top"):
        assert "atom" in {c for i in store.table(table).to_lance().list_indices() for c in i["fields"]}
    plan = store.table("atom_index").to_lance().scanner(filter="sae_id = 's1' AND atom = 3",
                                                         columns=["value"]).explain_plan()
    assert "ScalarIndexQuery" in plan and "atom_idx" in plan
    store.upsert("atom_index", [dict(sae_id="s9", atom=3, image_id="x", category="c", split="test", label=0,
                                     patch=0, value=1.0)])
    assert ensure_atom_indexes(store)["atom_index"] == ["atom", "sae_id", "category"]
    cfg = {c.columns[0]: c for c in store.table("atom_index").list_indices()}
    assert cfg["atom"].num_unindexed_rows == 0                   # appended rows are indexed, idempotently
