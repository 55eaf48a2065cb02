"""`spg store check [--repair]` finds and fixes a store damaged in each way a writer or an operator can damage it:
duplicate keys, orphan data files of a dead writer, a truncated data file, tokens without images rows, atom_top
without codes; and a reader of a damaged table fails in one line naming table and file."""

from __future__ import annotations

import os
import time

import lance
import numpy as np
import pytest
from click.testing import CliRunner

from spg_dist.cli import main
from spg_dist.errors import SpgError
from spg_dist.store import Store, load_schema, tokens_to_arrow, write_fragment
from spg_dist.store.check import check


def _tokens(ids, seed=0):
    rng = np.random.default_rng(seed)
    n = len(ids)
    meta = dict(backbone=["bb"] * n, layer=[1] * n, image_id=ids, dataset=["d"] * n, category=["c"] * n,
                split=["test"] * n, label=[0] * n, image_size=[32] * n)
    return tokens_to_arrow(meta, rng.standard_normal((n, 2, 2, 4)).astype(np.float16), "random-init")


def _image(i):
    return dict(image_id=i, dataset="d", category="c", split="test", label=0, defect_type="good",
                image_uri=f"/x/{i}.png", mask_uri="", width=32, height=32)


@pytest.fixture()
def store(tmp_path):
    s = Store(tmp_path / "s")
    ids = [f"d/img{i}" for i in range(8)]
    s.commit_fragments("patch_tokens", write_fragment(s.lance_uri("patch_tokens"), _tokens(ids),
                                                      load_schema("patch_tokens")))
    s.upsert("images", [_image(i) for i in ids])
    return s


def _age(path, seconds=7200):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_a_healthy_store_checks_ok(store):
    report = check(store)
    assert report.ok, report.lines()
    by = {t.name: t for t in report.tables}
    assert by["patch_tokens"].rows == 8 and by["patch_tokens"].distinct_keys == 8
    assert by["patch_tokens"].schema_version == by["patch_tokens"].code_version == 2


def test_duplicates_orphans_and_missing_images_rows_found_and_repaired(store):
    uri = store.lance_uri("patch_tokens")
    lance.write_dataset(_tokens(["d/img1", "d/img2"]), uri, mode="append")  # a foreign writer: 2 duplicates
    write_fragment(uri, _tokens(["d/img9"]), load_schema("patch_tokens"))  # a dead writer's uncommitted file
    orphan = max((os.path.join(uri, "data", f) for f in os.listdir(os.path.join(uri, "data"))), key=os.path.getmtime)
    _age(orphan)
    write_fragment(uri, _tokens(["d/img10"]), load_schema("patch_tokens"))  # a running writer's: too young
    store.table("images").delete("image_id = 'd/img3'")  # tokens without their images row
    report = check(store)
    by = {t.name: t for t in report.tables}
    assert by["patch_tokens"].duplicates == 2 and by["patch_tokens"].orphan_files == [os.path.basename(orphan)]
    assert by["patch_tokens"].young_orphans == 1
    assert any("1 images with tokens but no images row" in c for c in report.cross)
    r = CliRunner().invoke(main, ["store", "--store", store.uri, "check"])
    assert r.exit_code == 1 and "2 duplicate rows" in r.output and "1 orphan files" in r.output

    fixed = check(store, repair=True)
    assert any("removed 2 duplicate row(s)" in x for x in fixed.repaired)
    assert any("removed 1 orphan data file(s)" in x for x in fixed.repaired)
    assert any("spg extract" in x for x in fixed.not_repaired)  # images rows come back by re-running extract
    assert store.count("patch_tokens") == 8 and not os.path.exists(orphan)
    after = {t.name: t for t in check(store).tables}
    assert after["patch_tokens"].duplicates == 0 and not after["patch_tokens"].orphan_files


def test_a_truncated_data_file_is_named_and_dropped_on_request(store):
    ds = lance.dataset(store.lance_uri("patch_tokens"))
    path = os.path.join(ds.uri, "data", ds.get_fragments()[0].data_files()[0].path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    report = check(store)
    t = {x.name: x for x in report.tables}["patch_tokens"]
    assert t.damaged and os.path.basename(path) in t.damaged[0] and "truncated" in t.damaged[0]
    assert t.rows == 8  # the manifest still claims every row: that is why rows alone are not a check
    with pytest.raises(SpgError, match=r"table patch_tokens.*spg store check"):
        store.read("patch_tokens")
    kept = check(store, repair=True)
    assert any("--drop-damaged" in x for x in kept.not_repaired)
    dropped = check(store, repair=True, drop_damaged=True)
    assert any("dropped 1 damaged fragment" in x for x in dropped.repaired)
    assert store.count("patch_tokens") == 0 and check(store).ok  # consistent again; a re-run of extract restores them


def test_spg_store_lists_versions(store):
    r = CliRunner().invoke(main, ["store", "--store", store.uri])
    assert r.exit_code == 0
    line = next(x for x in r.output.splitlines() if x.startswith("patch_tokens"))
    assert "8 rows" in line and "schema v2" in line and "lance v" in line
