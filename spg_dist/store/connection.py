"""The feature store: a LanceDB database (a local directory, or ``s3://…``/``gs://…`` on a cluster).

Every table is created from its versioned schema on first use, so a store written by any stage is readable by
plain ``lancedb.connect(uri).open_table(name)``. Two write paths, both idempotent by the table's key:

* :meth:`Store.upsert` — small tables and driver-side writes: validated, de-duplicated, ``merge_insert``.
* :func:`write_fragment` + :meth:`Store.commit_fragments` — bulk tensor data: many workers each write a
  Lance fragment in parallel and the driver commits them in one ``Append`` (callers skip keys that already
  exist before writing, which is what keeps this path idempotent).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

import lance
import lancedb
import pyarrow as pa
import pyarrow.compute as pc

from spg_dist.errors import SpgError
from spg_dist.store.schemas import VERSION_KEY, SchemaError, TableSchema, load_schema


class StoreError(SpgError, RuntimeError):
    """The store cannot be used as asked (wrong schema version, missing table, bad URI)."""


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


class Store:
    """A handle on one store URI; cheap to create, safe to pickle into Ray tasks (it reconnects lazily)."""

    def __init__(self, uri: str | os.PathLike, storage_options: dict[str, str] | None = None):
        uri = os.fspath(uri)
        self.uri = os.path.abspath(uri) if _is_local(uri) else uri
        self.storage_options = storage_options or None
        self._db: Any = None

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "storage_options": self.storage_options, "_db": None}

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    @property
    def db(self):
        if self._db is None:
            if _is_local(self.uri):
                os.makedirs(self.uri, exist_ok=True)
            self._db = lancedb.connect(self.uri, storage_options=self.storage_options)
        return self._db

    def has_table(self, name: str) -> bool:
        return name in self.db.list_tables().tables

    def table(self, name: str):
        """Open ``name``, creating it from its schema when absent; refuse a table of another schema version."""
        schema = load_schema(name)
        if self.has_table(name):
            tbl = self.db.open_table(name)
        else:
            tbl = self.db.create_table(name, schema=schema.arrow, exist_ok=True)
        found = (tbl.schema.metadata or {}).get(VERSION_KEY)
        if found is not None and int(found) != schema.version:
            raise StoreError(f"{self.uri}: table {name!r} has schema version {int(found)}, this code writes "
                             f"version {schema.version}; migrate it or use a new store")
        return tbl

    def lance(self, name: str):
        """The table as a ``lance.LanceDataset`` (latest version), for scanners and fragment commits."""
        return self.table(name).to_lance()

    def lance_uri(self, name: str) -> str:
        """Where the table's Lance dataset lives (what fragment writers write next to)."""
        return self.lance(name).uri

    def count(self, name: str, where: str | None = None) -> int:
        if not self.has_table(name):
            return 0
        return self.db.open_table(name).count_rows(where)

    def counts(self) -> dict[str, int]:
        """Rows of every table the store holds (in schema order), for summaries."""
        from spg_dist.store.schemas import known_tables

        have = set(self.db.list_tables().tables)
        return {t: self.db.open_table(t).count_rows() for t in known_tables() if t in have}

    def read(self, name: str, where: str | None = None, columns: Sequence[str] | None = None) -> pa.Table:
        """A whole (filtered) table as Arrow; for big tensor tables prefer the streaming readers."""
        if not self.has_table(name):
            return load_schema(name).arrow.empty_table() if columns is None else \
                load_schema(name).arrow.empty_table().select(list(columns))
        ds = self.db.open_table(name).to_lance()
        return ds.to_table(columns=list(columns) if columns else None, filter=where)

    def keys(self, name: str, where: str | None = None) -> set[tuple]:
        """The set of key tuples present in ``name`` (optionally filtered)."""
        key = load_schema(name).key
        tbl = self.read(name, where=where, columns=key)
        cols = [tbl.column(k).to_pylist() for k in key]
        return set(zip(*cols))

    def upsert(self, name: str, data: pa.Table | Iterable[dict[str, Any]]) -> int:
        """Validate and merge ``data`` into ``name`` on its key; a repeated upsert adds nothing.

        Returns the number of rows given (after de-duplicating keys within the batch, last one wins).
        """
        schema = load_schema(name)
        table = data if isinstance(data, pa.Table) else pa.Table.from_pylist(list(data))
        if table.num_rows == 0:
            return 0
        table = dedupe_keys(schema.validate(table), schema)
        (self.table(name).merge_insert(list(schema.key))
         .when_matched_update_all().when_not_matched_insert_all().execute(table))
        return table.num_rows

    def commit_fragments(self, name: str, fragments: Sequence[str]) -> int:
        """Commit fragments written by :func:`write_fragment` as one atomic ``Append``; returns rows added."""
        metas = [lance.FragmentMetadata.from_json(f) for f in fragments if f]
        if not metas:
            return 0
        ds = self.table(name).to_lance()
        # Appends never conflict, so committing against the latest version is safe with concurrent writers.
        lance.LanceDataset.commit(ds.uri, lance.LanceOperation.Append(metas), read_version=ds.version,
                                  storage_options=self.storage_options)
        return sum(m.num_rows for m in metas)


def dedupe_keys(table: pa.Table, schema: TableSchema) -> pa.Table:
    """Keep the last row of each key: merge_insert requires unique source keys."""
    if table.num_rows < 2:
        return table
    idx = pa.array(range(table.num_rows), pa.int64())
    grouped = table.select(list(schema.key)).append_column("__i", idx).group_by(list(schema.key)).aggregate(
        [("__i", "max")])
    keep = pc.sort_indices(grouped.column("__i_max"))
    return table.take(pc.take(grouped.column("__i_max"), keep))


def write_fragment(lance_uri: str, table: pa.Table, schema: TableSchema,
                   storage_options: dict[str, str] | None = None) -> list[str]:
    """Write ``table`` as new data files of the dataset at ``lance_uri`` without committing them.

    Runs inside workers; returns JSON fragment descriptions for :meth:`Store.commit_fragments`. Uncommitted
    files left by a crash are invisible to readers and are removed by ``cleanup_old_versions``.
    """
    table = schema.validate(table)
    if table.num_rows == 0:
        return []
    frags = lance.fragment.write_fragments(table, lance_uri, schema=schema.arrow,
                                           storage_options=storage_options)
    return [json.dumps(f.to_json()) for f in frags]


__all__ = ["Store", "StoreError", "SchemaError", "write_fragment", "dedupe_keys"]
