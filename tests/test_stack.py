"""Facts about the pinned stack that our design depends on (README: "The store"; constraints.txt pins it), kept as tests so that a version bump
that changes them is noticed: Ray's built-in ``Dataset.write_lance`` is broken with pylance 14 (so we write
fragments ourselves), while lance-ray's writer and lancedb's merge_insert behave as we rely on."""

from __future__ import annotations

import lancedb
import pyarrow as pa
import pytest

pytestmark = pytest.mark.ray


@pytest.mark.xfail(strict=True, raises=TypeError, reason="Ray 2.60's write_lance passes storage_options_provider, "
                   "which pylance 14's write_fragments does not accept. If this XPASSes, a version moved: update "
                   "README.md ('The store') and consider the built-in writer again.")
def test_ray_builtin_write_lance_is_broken_with_pinned_pylance(ray_cluster, tmp_path):
    ds = ray_cluster.data.from_items([{"a": i} for i in range(4)])
    ds.write_lance(str(tmp_path / "t.lance"))


def test_lance_ray_writer_round_trips(ray_cluster, tmp_path):
    import lance
    import lance_ray

    ds = ray_cluster.data.from_items([{"a": i, "b": str(i)} for i in range(10)])
    lance_ray.write_lance(ds, str(tmp_path / "t.lance"))
    assert sorted(lance.dataset(str(tmp_path / "t.lance")).to_table().column("a").to_pylist()) == list(range(10))


def test_merge_insert_is_idempotent(tmp_path):
    db = lancedb.connect(str(tmp_path))
    tbl = db.create_table("t", data=pa.table({"k": [1, 2], "v": ["a", "b"]}))
    src = pa.table({"k": [2, 3], "v": ["B", "c"]})
    for _ in range(2):
        tbl.merge_insert("k").when_matched_update_all().when_not_matched_insert_all().execute(src)
    assert sorted(tbl.to_arrow().to_pylist(), key=lambda r: r["k"]) == [
        {"k": 1, "v": "a"}, {"k": 2, "v": "B"}, {"k": 3, "v": "c"}]
