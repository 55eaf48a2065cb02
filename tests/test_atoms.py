"""Atom tables and queries on hand-built stores whose codes are planted, so every answer is known: atom_top (top-N
per atom overall and per category, ties included) and atom_images (per (atom, image) count, sum, max, argmax) equal
independent computations; the build is idempotent, and after an interruption (codes committed in parts, a kill
between the two table commits, codes changing under a build) or two builds racing, the tables equal a fresh build."""

from __future__ import annotations

import datetime as dt
import math
import threading

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from spg_dist.store import Store, StoreError, codes, load_schema, write_fragment
from spg_dist.store.atoms import (AtomQueryError, activation_maps, atom_activation_map, atom_stats,
                                  brute_force_top, ensure_atom_indexes, images_firing, top_patches)
from spg_dist.viz import atom_gallery_png, atom_stats_png, upsample_bilinear

GH, GW, K, C, N_TOP = 4, 4, 3, 16, 5
CATS = ("bottle", "cable", "grid")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sae_model(sae_id: str, c: int) -> dict:
    return dict(sae_id=sae_id, backbone="bb", layer=1, d=8, C=c, k=K, sparsifier="topk", run="r", config="{}",
                metrics="{}", nmse=0.1, explained_variance=0.9, l0=float(K), dead_fraction=0.0, steps=1,
                tokens_seen=1, weights=b"", firing_histogram_png=b"", run_dir="/tmp",
                created_at=dt.datetime(2025, 1, 1))


def _code_rows(sae_id: str, images: list[tuple[str, str, int]], planted: dict, gh: int = GH, gw: int = GW,
               k: int = K) -> list[dict]:
    return [dict(sae_id=sae_id, image_id=iid, dataset="d", category=cat, split="test", label=label, grid_h=gh,
                 grid_w=gw, k=k, indices=planted[iid][0].ravel().tolist(), values=planted[iid][1].ravel().tolist())
            for iid, cat, label in images]


def _write_images(store: Store, tmp_path, images: list[tuple[str, str, int]]) -> None:
    rng = np.random.default_rng(1)
    rows = []
    for iid, cat, label in images:
        path = tmp_path / (iid.replace("/", "_") + ".png")
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
        rows.append(dict(image_id=iid, dataset="d", category=cat, split="test", label=label,
                         defect_type="good" if label == 0 else "bad", image_uri=str(path), mask_uri="",
                         width=40, height=30))
    store.upsert("images", rows)


def _plant(images, seed: int = 0, c: int = C) -> dict:
    """Random codes with many ties (values on a 0.5 grid) and BatchTopK padding (an index with value 0)."""
    rng = np.random.default_rng(seed)
    out = {}
    for iid, _, _ in images:
        idx = np.stack([rng.permutation(c)[:K] for _ in range(GH * GW)]).astype(np.int32)
        val = (rng.integers(1, 8, (GH * GW, K)) * 0.5).astype(np.float32)
        val[rng.random((GH * GW, K)) < 0.15] = 0.0
        out[iid] = (idx, val)
    return out


def _reference_top(planted, cats, atom, n, category=None) -> list[tuple[str, int, float]]:
    """Independent top-n from the planted arrays: (image_id, patch, value), value desc then id, patch."""
    hits = [(iid, int(p), float(val[p, j])) for iid, (idx, val) in planted.items()
            if category is None or cats[iid] == category
            for p, j in zip(*np.nonzero((idx == atom) & (val > 0)))]
    return sorted(hits, key=lambda h: (-h[2], h[0], h[1]))[:n]


def _reference_images(planted, cats, labels) -> dict[tuple[int, str], tuple]:
    """(atom, image_id) -> (category, label, count, sum, max, lowest patch at the max), by plain loops."""
    out = {}
    for iid, (idx, val) in planted.items():
        for p in range(idx.shape[0]):
            for j in range(idx.shape[1]):
                if val[p, j] <= 0:
                    continue
                a, v = int(idx[p, j]), float(val[p, j])
                cat, lab, cnt, s, mx, mp = out.get((a, iid), (cats[iid], labels[iid], 0, 0.0, -1.0, -1))
                if v > mx:
                    mx, mp = v, p
                out[(a, iid)] = (cat, lab, cnt + 1, s + v, mx, mp)
    return out


def _triples(t: pa.Table) -> list[tuple[str, int, float]]:
    return [(r["image_id"], r["patch"], pytest.approx(r["value"], rel=1e-6)) for r in t.to_pylist()]


def derived(store: Store, sae_id: str) -> tuple[pa.Table, pa.Table]:
    """atom_top and atom_images rows of an SAE in key order, without sae_id: what two builds must agree on."""
    top = store.read("atom_top", f"sae_id = '{sae_id}'").drop_columns(["sae_id"])
    img = store.read("atom_images", f"sae_id = '{sae_id}'").drop_columns(["sae_id"])
    return (top.sort_by([("scope", "ascending"), ("atom", "ascending"), ("rank", "ascending")]),
            img.sort_by([("atom", "ascending"), ("image_id", "ascending")]))


def fresh_build(tmp_path, rows: list[dict], top_n: int = N_TOP) -> tuple[pa.Table, pa.Table]:
    """The reference: every code row committed at once into a new store, one build."""
    s = Store(tmp_path / f"fresh_{np.random.default_rng().integers(1 << 30)}")
    s.upsert("sae_codes", rows)
    codes.build_atoms(s, rows[0]["sae_id"], top_n=top_n, index=False)
    return derived(s, rows[0]["sae_id"])


def commit_codes(store: Store, rows: list[dict]) -> int:
    """What an encode's driver does with a window of codes: one fragment, committed exactly once."""
    schema = load_schema("sae_codes")
    return codes.commit(store, write_fragment(codes.lance_uri(store), schema.validate(pa.Table.from_pylist(rows)),
                                              schema))


IMAGES_S1 = [(f"d/{c}/test/{i:03d}", c, i % 2) for c in CATS for i in range(3)]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("atoms")
    store = Store(tmp / "store")
    planted = _plant(IMAGES_S1)
    _write_images(store, tmp, IMAGES_S1)
    store.upsert("sae_codes", _code_rows("s1", IMAGES_S1, planted))
    store.upsert("sae_models", [_sae_model("s1", C), _sae_model("s2", 4)])
    # s2: a tiny case computed by hand (grid 2x2, k=2). A holds 4 patches, B 8 (two images).
    z = np.zeros((4, 2), np.float32)
    s2 = {"d/A/0": (np.array([[0, 1], [0, 3], [3, 0], [0, 0]], np.int32),
                    np.array([[1.0, 2.0], [3.0, 0], [0.5, 0], [0, 0]], np.float32)),
          "d/B/0": (np.array([[1, 0], [0, 0], [0, 0], [0, 0]], np.int32), np.array([[2.0, 0], *z[1:]], np.float32)),
          "d/B/1": (np.zeros((4, 2), np.int32), z)}
    s2_images = [("d/A/0", "A", 0), ("d/B/0", "B", 1), ("d/B/1", "B", 0)]
    _write_images(store, tmp, s2_images)
    for sid in ("s2", "s3"):
        store.upsert("sae_codes", _code_rows(sid, s2_images, s2, 2, 2, 2))
    for sid in ("s1", "s2", "s3"):
        res = codes.build_atoms(store, sid, top_n=N_TOP)
        assert res.rebuilt == ("atom_images", "atom_top")
    cats = {iid: c for iid, c, _ in IMAGES_S1}
    labels = {iid: lab for iid, _, lab in IMAGES_S1}
    return store, planted, cats, labels, tmp


def test_atom_top_holds_top_n_overall_and_per_category(planted):
    store, codes_, cats, _, _ = planted
    top = store.read("atom_top", "sae_id = 's1'")
    assert set(top.column("scope").to_pylist()) == {"", *CATS}
    assert set(top.column("top_n").to_pylist()) == {N_TOP}
    by = {}
    for r in top.to_pylist():
        by.setdefault((r["scope"], r["atom"]), []).append(r)
    for atom in range(C):
        for scope in ("", *CATS):
            want = _reference_top(codes_, cats, atom, N_TOP, scope or None)
            rows = sorted(by.get((scope, atom), []), key=lambda r: r["rank"])
            assert [(r["image_id"], r["patch"], r["value"]) for r in rows] == want
            assert [r["rank"] for r in rows] == list(range(len(want)))
            assert all(r["row"] == r["patch"] // GW and r["col"] == r["patch"] % GW for r in rows)
            assert all(r["category"] == cats[r["image_id"]] for r in rows)


@pytest.mark.parametrize("n", [3, 8, 40])
def test_top_patches_match_brute_force_and_planted(planted, n):
    store, codes_, cats, _, _ = planted
    ties = 0
    for atom in range(C):
        for cat in (None, *CATS):                       # n > N_TOP: the exact path through atom_images
            want = _reference_top(codes_, cats, atom, n, cat)
            got = top_patches(store, "s1", atom, n, category=cat)
            assert _triples(got) == want
            if n == 8 and atom % 2 == 0:
                assert _triples(brute_force_top(store, "s1", atom, n, category=cat)) == want
            assert got.column("rank").to_pylist() == list(range(len(want)))
            assert got.column("row").to_pylist() == [p // GW for _, p, _ in want]
            assert got.column("col").to_pylist() == [p % GW for _, p, _ in want]
            assert cat is None or set(got.column("category").to_pylist()) <= {cat}
            vals = [v for _, _, v in want]
            ties += len(vals) - len(set(vals))
    assert ties > 20                                    # the planted values really do tie


def test_atom_images_equal_hand_aggregation(planted):
    store, codes_, cats, labels, _ = planted
    want = _reference_images(codes_, cats, labels)
    got = store.read("atom_images", "sae_id = 's1'")
    assert got.num_rows == len(want)
    for r in got.to_pylist():
        cat, lab, cnt, s, mx, mp = want[(r["atom"], r["image_id"])]
        assert (r["category"], r["label"], r["split"], r["count"], r["max_value"], r["max_patch"]) == \
            (cat, lab, "test", cnt, mx, mp)
        assert r["sum_value"] == pytest.approx(s, rel=1e-12)
    for atom in (0, 7):
        for cat in (None, "cable"):
            t = images_firing(store, "s1", atom, cat)
            exp = sorted(((iid, v) for (a, iid), v in want.items() if a == atom and (cat is None or v[0] == cat)),
                         key=lambda x: (-x[1][4], x[0]))
            assert t.column("image_id").to_pylist() == [iid for iid, _ in exp]
            assert t.column("count").to_pylist() == [v[2] for _, v in exp]
            assert t.column("row").to_pylist() == [v[5] // GW for _, v in exp]


def test_activation_maps_equal_planted_codes(planted):
    store, codes_, _, _, _ = planted
    for iid, (idx, val) in codes_.items():
        for atom in (0, 5, 15):
            want = ((idx == atom) * val).sum(1).reshape(GH, GW)
            np.testing.assert_allclose(atom_activation_map(store, "s1", iid, atom), want, rtol=1e-6)
    assert set(activation_maps(store, "s1", list(codes_), 2)) == set(codes_)


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
    fired = sum(int((v > 0).sum()) for _, v in planted[1].values())
    assert s1["count"].sum() == fired
    for j, c in enumerate(CATS):                                 # mass per category = sums of planted values
        want = np.zeros(C)
        for iid, (idx, val) in planted[1].items():
            if planted[2][iid] == c:
                np.add.at(want, idx[val > 0], val[val > 0])
        np.testing.assert_allclose(s1[f"mass:{c}"], want, rtol=1e-12)
    assert ((s1["category_entropy"].dropna() >= 0) & (s1["category_entropy"].dropna() <= 1 + 1e-9)).all()


def test_pngs_are_written(planted):
    store, _, _, _, tmp = planted
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
        atom_stats(Store(planted[4] / "empty_store"), "s1")
    store.upsert("sae_codes", [dict(sae_id="s4", image_id="d/A/0", dataset="d", category="A", split="test", label=0,
                                    grid_h=2, grid_w=2, k=1, indices=[0] * 4, values=[1.0] * 4)])
    for query, table in ((lambda: atom_stats(store, "s4"), "atom_images"),
                         (lambda: top_patches(store, "s4", 0), "atom_top"),
                         (lambda: images_firing(store, "s4", 0), "atom_images")):
        with pytest.raises(AtomQueryError, match=f"{table} has no rows for SAE 's4'; run `spg encode --sae s4`"):
            query()
    codes.build_atoms(store, "s4", top_n=2, index=False)
    store.upsert("sae_codes", [dict(sae_id="s4", image_id="d/B/0", dataset="d", category="A", split="test",
                                    label=0, grid_h=2, grid_w=2, k=1, indices=[0] * 4, values=[2.0] * 4)])
    for query in (lambda: atom_stats(store, "s4"), lambda: top_patches(store, "s4", 0),
                  lambda: top_patches(store, "s4", 0, 9)):
        with pytest.raises(AtomQueryError, match=r"of SAE 's4' is stale.*2 images sae_codes holds now.*spg encode"):
            query()                                            # never a silently short answer
    assert codes.build_atoms(store, "s4", top_n=2).rebuilt == ("atom_images", "atom_top")
    assert top_patches(store, "s4", 0, 2).column("image_id").to_pylist() == ["d/B/0", "d/B/0"]


def test_indexes_are_used_and_kept_fresh(planted):
    store = planted[0]
    for table, extra in (("atom_top", " AND scope = 'cable'"), ("atom_images", " AND category = 'cable'")):
        plan = store.table(table).to_lance().scanner(filter=f"sae_id = 's1' AND atom = 3{extra}",
                                                     columns=["count" if table == "atom_images" else "value"]
                                                     ).explain_plan()
        assert "ScalarIndexQuery" in plan and "atom_idx" in plan and "sae_id_idx" in plan, plan
    store.upsert("sae_codes", _code_rows("s9", IMAGES_S1[:2], planted[1]))
    codes.build_atoms(store, "s9", top_n=2)
    assert ensure_atom_indexes(store) == {"atom_images": ["atom", "sae_id", "category"],
                                          "atom_top": ["atom", "sae_id", "scope"]}
    for table in ("atom_top", "atom_images"):
        for cfg in store.table(table).list_indices():
            assert cfg.num_unindexed_rows == 0                   # rows of a new build are indexed, idempotently


# ------------------------------------------------------------------------------- interruptions and races
def _rows(n_images: int, sae_id: str = "r", seed: int = 3) -> list[dict]:
    images = [(f"d/{CATS[i % 3]}/{i:03d}", CATS[i % 3], i % 2) for i in range(n_images)]
    return _code_rows(sae_id, images, _plant(images, seed))


def test_rebuild_is_idempotent_and_skips_when_current(tmp_path):
    rows = _rows(12)
    s = Store(tmp_path / "s")
    commit_codes(s, rows)
    first = codes.build_atoms(s, "r", top_n=N_TOP)
    assert first.rebuilt == ("atom_images", "atom_top") and first.images == 12
    v = {t: s.lance(t).version for t in ("atom_top", "atom_images")}
    again = codes.build_atoms(s, "r", top_n=N_TOP)
    assert again.rebuilt == () and {t: s.lance(t).version for t in v} == v     # nothing written
    assert codes.build_atoms(s, "r", top_n=3).rebuilt == ("atom_top",)          # another N: atom_top only
    codes.build_atoms(s, "r", top_n=N_TOP)
    forced = codes.build_atoms(s, "r", top_n=N_TOP, force=True)
    assert forced.rebuilt == ("atom_images", "atom_top")
    want = fresh_build(tmp_path, rows)
    got = derived(s, "r")
    assert got[0].equals(want[0]) and got[1].equals(want[1])
    assert s.count("atom_top") == want[0].num_rows and s.count("atom_images") == want[1].num_rows


def test_interrupted_encode_then_rerun_equals_fresh_build(tmp_path):
    """An encode killed after its first codes commit (no build ran), then re-run over the remaining images: the
    issue's atom_top missed thousands of entries here; the rebuild reads all of sae_codes."""
    rows = _rows(18)
    s = Store(tmp_path / "s")
    commit_codes(s, rows[:7])                                   # first window committed, then killed
    with pytest.raises(AtomQueryError, match="no current atom_top"):
        top_patches(s, "r", 0)
    commit_codes(s, rows[7:])                                   # the re-run encodes the rest ...
    codes.build_atoms(s, "r", top_n=N_TOP)                     # ... and builds
    want = fresh_build(tmp_path, rows)
    got = derived(s, "r")
    assert got[0].equals(want[0]) and got[1].equals(want[1])
    # killed once more, between the two table commits of a build that followed new codes
    more = _rows(20)[18:]
    commit_codes(s, more)

    def die(stage):
        if stage == "committed:atom_images":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        codes.build_atoms(s, "r", top_n=N_TOP, hook=die)
    with pytest.raises(AtomQueryError, match="atom_top of SAE 'r' is stale"):
        top_patches(s, "r", 0)
    res = codes.build_atoms(s, "r", top_n=N_TOP)
    assert res.rebuilt == ("atom_top",)                         # atom_images was already current
    want = fresh_build(tmp_path, rows + more)
    got = derived(s, "r")
    assert got[0].equals(want[0]) and got[1].equals(want[1])


def test_codes_committed_under_a_build_restart_it(tmp_path):
    rows = _rows(15)
    s = Store(tmp_path / "s")
    commit_codes(s, rows[:5])
    late = iter([rows[5:]])

    def race(stage):          # another encode commits codes after this build read sae_codes, before it commits
        if stage == "computed":
            batch = next(late, None)
            if batch:
                commit_codes(s, batch)

    res = codes.build_atoms(s, "r", top_n=N_TOP, hook=race)
    assert res.restarts == 1 and res.images == 15
    want = fresh_build(tmp_path, rows)
    got = derived(s, "r")
    assert got[0].equals(want[0]) and got[1].equals(want[1])


def test_racing_encodes_leave_every_key_once_and_exact_tables(tmp_path):
    """Two encodes of one SAE at once (threads): each commits overlapping windows of codes, then builds; a third
    SAE's build runs in between (table-level conflicts between SAEs). Every key is stored once and the tables
    equal a fresh build."""
    rows = _rows(24)
    other = _rows(6, "q", seed=9)
    s = Store(tmp_path / "s")
    commit_codes(s, rows[:2])
    codes.build_atoms(s, "r", top_n=N_TOP)                      # tables exist and hold an older build
    errors = []

    def encoder(windows):
        try:
            for w in windows:
                commit_codes(s, w)
                codes.build_atoms(s, "r", top_n=N_TOP)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def third():
        try:
            commit_codes(s, other)
            codes.build_atoms(s, "q", top_n=N_TOP)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    a = threading.Thread(target=encoder, args=([rows[0:10], rows[8:18], rows[16:24]],))
    b = threading.Thread(target=encoder, args=([rows[4:14], rows[12:24]],))
    c = threading.Thread(target=third)
    for t in (a, b, c):
        t.start()
    for t in (a, b, c):
        t.join()
    assert not errors, errors
    keys = s.read("sae_codes", columns=["sae_id", "image_id"])
    assert keys.num_rows == 30 == len(set(zip(*(keys.column(c).to_pylist() for c in ("sae_id", "image_id")))))
    for sid, r in (("r", rows), ("q", other)):
        want = fresh_build(tmp_path, r)
        got = derived(s, sid)
        assert got[0].equals(want[0]) and got[1].equals(want[1]), sid
    n_top = sum(fresh_build(tmp_path, r)[0].num_rows for r in (rows, other))
    assert s.count("atom_top") == n_top                          # no leftover rows of older builds
    for sid in ("r", "q"):
        for atom in range(C):
            assert top_patches(s, sid, atom, 4, "grid").equals(brute_force_top(s, sid, atom, 4, "grid"))


def test_old_atom_top_table_is_rebuilt(tmp_path):
    """A store written before atom_top v2 (no scope column): the build drops the derived table and rebuilds it."""
    s = Store(tmp_path / "s")
    commit_codes(s, _rows(4))
    old = pa.schema([("sae_id", pa.string()), ("atom", pa.int32()), ("rank", pa.int32())],
                    metadata={b"spg.schema_version": b"1", b"spg.table": b"atom_top"})
    s.db.create_table("atom_top", data=pa.table({"sae_id": ["r"], "atom": [1], "rank": [0]}, schema=old))
    with pytest.raises(AtomQueryError, match="no current atom_top"):
        top_patches(s, "r", 1)
    codes.build_atoms(s, "r", top_n=N_TOP)
    assert top_patches(s, "r", 1, 3).equals(brute_force_top(s, "r", 1, 3))
