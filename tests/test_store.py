"""The store: schemas from schemas/, validation, idempotent upserts, fragment commits, plain-lancedb reads."""

from __future__ import annotations

import datetime as dt

import lancedb
import numpy as np
import pyarrow as pa
import pytest

from spg_dist.store import (SchemaError, Store, StoreError, iter_tokens, known_tables, load_schema,
                            load_tokens, tokens_from_arrow, tokens_to_arrow, where, write_fragment)
from spg_dist.errors import SpgError
from spg_dist.store.schemas import VERSION_KEY, parse_type


def _image_rows(n, dataset="d"):
    return [dict(image_id=f"{dataset}/c/test/bad/{i:03d}", dataset=dataset, category="c", split="test", label=1,
                 defect_type="bad", image_uri=f"/x/{i}.png", mask_uri=f"/x/{i}_mask.png", width=32, height=24)
            for i in range(n)]


def _token_table(ids, h=2, w=3, d=4, backbone="bb", layer=1, seed=0):
    rng = np.random.default_rng(seed)
    toks = rng.standard_normal((len(ids), h, w, d)).astype(np.float16)
    meta = dict(backbone=[backbone] * len(ids), layer=[layer] * len(ids), image_id=list(ids),
                dataset=["d"] * len(ids), category=["c"] * len(ids), split=["test"] * len(ids),
                label=[1] * len(ids), image_size=[32] * len(ids))
    return tokens_to_arrow(meta, toks, weights="random-init"), toks


def test_every_design_table_has_a_versioned_schema():
    assert {"images", "patch_tokens", "errors"} <= set(known_tables())
    s = load_schema("patch_tokens")
    assert s.key == ("backbone", "layer", "image_id")
    assert s.arrow.metadata[VERSION_KEY] == b"2"
    assert s.arrow.field("tokens").type == pa.large_list(pa.float16())
    assert not s.arrow.field("image_id").nullable


def test_parse_type():
    assert parse_type("fixed_size_list<float32>[8]") == pa.list_(pa.float32(), 8)
    assert parse_type("list<int32>") == pa.list_(pa.int32())
    with pytest.raises(ValueError):
        parse_type("tensor<float>")


def test_validation_names_table_column_and_row():
    s = load_schema("images")
    rows = _image_rows(3)
    rows[2]["category"] = None
    with pytest.raises(SchemaError, match=r"images: column 'category' is null at row 2"):
        s.validate(pa.Table.from_pylist(rows))
    with pytest.raises(SchemaError, match="missing column"):
        s.validate(pa.table({"image_id": ["a"]}))
    bad = pa.Table.from_pylist(_image_rows(1)).append_column("oops", pa.array([1]))
    with pytest.raises(SchemaError, match="unknown column"):
        s.validate(bad)
    wrong = pa.Table.from_pylist(_image_rows(1)).set_column(4, "label", pa.array(["x"]))
    with pytest.raises(SchemaError, match="label"):
        s.validate(wrong)
    out = s.validate(pa.Table.from_pylist(_image_rows(2)))  # int64 label -> int8, safe cast
    assert out.schema.field("label").type == pa.int8()


def test_upsert_is_idempotent_and_updates(tmp_path):
    store = Store(tmp_path / "s")
    assert store.upsert("images", _image_rows(4)) == 4
    assert store.upsert("images", _image_rows(4) + _image_rows(4)) == 4  # duplicate keys in one batch too
    assert store.count("images") == 4
    changed = _image_rows(4)
    changed[1]["width"] = 99
    store.upsert("images", changed)
    t = store.read("images", where="width = 99")
    assert t.column("image_id").to_pylist() == ["d/c/test/bad/001"] and store.count("images") == 4


def test_fragments_commit_and_plain_lancedb_reads(tmp_path):
    store = Store(tmp_path / "s")
    ids = [f"d/img{i}" for i in range(5)]
    table, toks = _token_table(ids)
    frags = write_fragment(store.lance_uri("patch_tokens"), table.slice(0, 3), load_schema("patch_tokens"))
    frags += write_fragment(store.lance_uri("patch_tokens"), table.slice(3), load_schema("patch_tokens"))
    assert store.count("patch_tokens") == 0  # written, not yet committed: invisible
    assert store.commit_fragments("patch_tokens", frags) == 5
    # A user without our code: plain lancedb, then a reshape with the row's own grid columns.
    tbl = lancedb.connect(str(tmp_path / "s")).open_table("patch_tokens")
    row = tbl.search().where("image_id = 'd/img3'").to_pandas().iloc[0]
    got = np.asarray(row["tokens"], dtype=np.float16).reshape(row["grid_h"], row["grid_w"], row["dim"])
    np.testing.assert_array_equal(got, toks[3])


def test_token_readers_round_trip(tmp_path):
    store = Store(tmp_path / "s")
    ids = [f"d/img{i}" for i in range(7)]
    table, toks = _token_table(ids)
    other, _ = _token_table(ids, backbone="other", d=8)
    store.commit_fragments("patch_tokens", write_fragment(store.lance_uri("patch_tokens"),
                                                          pa.concat_tables([table, other]),
                                                          load_schema("patch_tokens")))
    meta, got = load_tokens(store, "bb", 1)
    assert meta.column("image_id").to_pylist() == ids
    np.testing.assert_array_equal(got, toks)
    batches = list(iter_tokens(store, "bb", 1, batch_size=3))
    assert sum(b[1].shape[0] for b in batches) == 7 and all(b[1].shape[1:] == (2, 3, 4) for b in batches)
    assert list(iter_tokens(store, "bb", 2)) == []
    with pytest.raises(SpgError, match="different token grids"):
        tokens_from_arrow(store.read("patch_tokens"))


def test_torch_reader_streams_tokens(tmp_path):
    import torch

    from spg_dist.store import TokenDataset

    store = Store(tmp_path / "s")
    table, toks = _token_table([f"d/{i}" for i in range(4)])
    store.commit_fragments("patch_tokens", write_fragment(store.lance_uri("patch_tokens"), table,
                                                          load_schema("patch_tokens")))
    blocks = list(torch.utils.data.DataLoader(TokenDataset(store, "bb", 1, images_per_block=2), batch_size=None))
    got = torch.cat(blocks)
    assert got.shape == (4 * 2 * 3, 4)
    np.testing.assert_array_equal(np.sort(got.numpy().ravel()), np.sort(toks.ravel()))


def test_filters_are_literals_whatever_the_value(tmp_path):
    """A user value such as O'Brien or x' OR 1=1 -- matches only itself: filters are LanceDB typed expressions."""
    store = Store(tmp_path / "s")
    names = ["O'Brien", "x' OR 1=1 --", "plain", "x", "a\\b", "%", "_"]
    rows = [{**_image_rows(1)[0], "image_id": f"id{i}", "dataset": n} for i, n in enumerate(names)]
    store.upsert("images", rows)
    for i, n in enumerate(names):
        got = store.read("images", where=where(dataset=n), columns=["image_id"]).column("image_id").to_pylist()
        assert got == [f"id{i}"], n
    both = store.read("images", where=where(dataset=[names[0], names[1]]), columns=["image_id"])
    assert sorted(both.column("image_id").to_pylist()) == ["id0", "id1"]
    assert where(category=[]) == "false" and where() is None and where(split=None) is None
    assert store.count("images", where(dataset="nobody' OR '1'='1")) == 0
    with pytest.raises(ValueError, match="not a column name"):
        where(**{"x; DROP": 1})
    with pytest.raises(TypeError, match="not a plain scalar"):
        where(dataset=object())


def test_schema_version_mismatch_is_refused(tmp_path):
    store = Store(tmp_path / "s")
    schema = load_schema("errors").arrow
    old = schema.with_metadata({**schema.metadata, VERSION_KEY: b"0"})
    lancedb.connect(store.uri).create_table("errors", schema=old)
    with pytest.raises(StoreError, match="schema version 0"):
        store.table("errors")


def test_timestamps_and_errors_table(tmp_path):
    store = Store(tmp_path / "s")
    row = dict(stage="decode", backbone="bb", image_id="d/x", dataset="d", uri="/x.png", reason="truncated",
               created_at=dt.datetime(2026, 1, 1))
    store.upsert("errors", [row])
    store.upsert("errors", [{**row, "reason": "still truncated"}])
    assert store.read("errors").column("reason").to_pylist() == ["still truncated"]
