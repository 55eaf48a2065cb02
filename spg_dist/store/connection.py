"""The feature store: a LanceDB database (a local directory, or ``s3://…``/``gs://…`` on a cluster).

Every table is created from its versioned schema on first use, so a store written by any stage is readable by
plain ``lancedb.connect(uri).open_table(name)``. Two write paths, both idempotent by the table's key:

* :meth:`Store.upsert` — small tables and driver-side writes: validated, de-duplicated, ``merge_insert``.
* :func:`write_fragment` + :meth:`Store.commit_fragments` — bulk tensor data: many workers each write a
  Lance fragment in parallel and the driver commits them in one ``Append`` (callers skip keys that already
  exist before writing, which is what keeps this path idempotent).
"""

from __future__ import annotations

import contextlib
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


# S3 connection settings a user sets in the environment (the AWS SDK's names, which Lance also reads), per storage
# option and its accepted spellings. Credentials are not among them: each process takes those from its own AWS chain.
_S3_ENV = {("aws_endpoint", "aws_endpoint_url", "endpoint", "endpoint_url"):
           ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"),
           ("allow_http", "aws_allow_http"): ("AWS_ALLOW_HTTP",),
           ("aws_region", "region", "aws_default_region"): ("AWS_REGION", "AWS_DEFAULT_REGION")}


def with_s3_env(uri: str, storage_options: dict[str, str] | None) -> dict[str, str] | None:
    """``storage_options`` plus the endpoint, ``allow_http`` and region set in the environment, for an ``s3://`` URI
    (explicit options win): a Store pickled into Ray workers then talks to the driver's endpoint, whatever the
    workers' environment says."""
    opts = dict(storage_options or {})
    if uri.startswith("s3://"):
        given = {k.lower() for k in opts}
        for keys, names in _S3_ENV.items():
            value = next((os.environ[n] for n in names if os.environ.get(n)), None)
            if value and not given & set(keys):
                opts[keys[0]] = value
    return opts or None


class Store:
    """A handle on one store URI; cheap to create, safe to pickle into Ray tasks (it reconnects lazily)."""

    def __init__(self, uri: str | os.PathLike, storage_options: dict[str, str] | None = None):
        uri = os.fspath(uri)
        self.uri = os.path.abspath(uri) if _is_local(uri) else uri
        self.storage_options = with_s3_env(self.uri, storage_options)
        self._db: Any = None

    @classmethod
    def open_existing(cls, uri: str | os.PathLike, storage_options: dict[str, str] | None = None) -> "Store":
        """A handle on a store that must already exist (every command but the ones that make a store): a local
        folder holding at least one table, or a ``s3://…``/``gs://…`` URI whose listing shows one (a URI whose
        listing fails is let through: the command says what is wrong). Unlike ``Store(uri)`` nothing is created."""
        store = cls(uri, storage_options)
        if _is_local(store.uri):
            path = store.uri[len("file://"):] if store.uri.startswith("file://") else store.uri
            exists = os.path.isdir(path) and any(n.endswith(".lance") for n in os.listdir(path))
        else:
            try:
                exists = bool(lancedb.connect(store.uri, storage_options=store.storage_options).list_tables().tables)
            except Exception:  # noqa: BLE001 - cannot tell cheaply; the command's first read says what is wrong
                exists = True
        if not exists:
            raise StoreError(f"no store at {store.uri} (make one with `spg extract ...` or `spg demo`; check the path)")
        return store

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
        with self.reading(name):
            return ds.to_table(columns=list(columns) if columns else None, filter=where)

    @contextlib.contextmanager
    def reading(self, name: str):
        """A damaged table (a truncated or missing data file) fails in one line naming the table, the file where
        Lance says it, and the command that looks deeper, instead of a page of Rust traceback."""
        try:
            yield
        except (OSError, ValueError, RuntimeError) as e:
            if isinstance(e, SpgError):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StoreError(f"table {name} of {self.uri} cannot be read ({first[:300]}); run `spg store check "
                             f"--store {self.uri}` to find the damaged file") from None

    def keys(self, name: str, where: str | None = None) -> set[tuple]:
        """The set of key tuples present in ``name`` (optionally filtered)."""
        key = load_schema(name).key
        tbl = self.read(name, where=where, columns=key)
        cols = [tbl.column(k).to_pylist() for k in key]
        return set(zip(*cols))

    def upsert(self, name: str, data: pa.Table | Iterable[dict[str, Any]]) -> int:
        """Validate and merge ``data`` into ``name`` on its key; a repeated upsert adds nothing, and concurrent
        upserts of the same keys keep each key once (:mod:`spg_dist.store.commits`).

        Returns the number of rows given (after de-duplicating keys within the batch, last one wins).
        """
        from spg_dist.store import commits

        schema = load_schema(name)
        table = data if isinstance(data, pa.Table) else pa.Table.from_pylist(list(data))
        if table.num_rows == 0:
            return 0
        table = dedupe_keys(schema.validate(table), schema)
        commits.upsert(self.lance_uri(name), table, list(schema.key), self.storage_options)
        return table.num_rows

    def dedupe(self, name: str, where: str | None = None) -> int:
        """Delete every row whose key occurs more than once but the first (in one commit); returns rows removed."""
        from spg_dist.store import commits

        if not self.has_table(name):
            return 0
        ds = self.lance(name)
        dup = commits.duplicate_rows(ds, list(load_schema(name).key), where)
        if dup.num_rows == 0:
            return 0
        return commits.delete_rows(ds.uri, dup.column("_rowaddr").to_pylist(), self.storage_options)

    def commit_fragments(self, name: str, fragments: Sequence[str]) -> int:
        """Commit fragments written by :func:`write_fragment` in one commit that stores every key once, even when
        another writer committed some of the same keys meanwhile (those rows are dropped); returns rows added."""
        from spg_dist.store import commits

        metas = [lance.FragmentMetadata.from_json(f) for f in fragments if f]
        if not metas:
            return 0
        schema = load_schema(name)
        probe = "image_id" if "image_id" in schema.key else schema.key[0]
        return commits.commit_append(self.lance_uri(name), metas, list(schema.key), probe, self.storage_options,
                                     schema.arrow)


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
