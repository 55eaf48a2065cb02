"""Versioned Arrow schemas of the store's tables, read from the JSON files in ``schemas/``.

The JSON files are the single source of truth (readable without our code, diffable in review); this module
turns them into ``pyarrow.Schema`` objects carrying their version in the schema metadata and validates every
batch before it is written, so a bad row is refused with its table, column and row named instead of
landing in the store.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import pyarrow as pa

from spg_dist.errors import SpgError

VERSION_KEY = b"spg.schema_version"
TABLE_KEY = b"spg.table"

_PRIMITIVES = {
    "string": pa.string(),
    "large_string": pa.large_string(),
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "uint32": pa.uint32(),
    "float16": pa.float16(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "binary": pa.binary(),
    "large_binary": pa.large_binary(),
    "timestamp[us]": pa.timestamp("us"),
}


class SchemaError(SpgError, ValueError):
    """A batch that does not fit its table's schema; the message names table, column and row."""


def parse_type(spec: str) -> pa.DataType:
    """'int32', 'list<float16>', 'large_list<float16>', 'fixed_size_list<float32>[64]' -> Arrow type."""
    spec = spec.strip()
    if spec in _PRIMITIVES:
        return _PRIMITIVES[spec]
    m = re.fullmatch(r"(large_list|list|fixed_size_list)<(.+)>(?:\[(\d+)\])?", spec)
    if not m:
        raise ValueError(f"unknown type {spec!r} in a schema file")
    kind, inner, size = m.group(1), parse_type(m.group(2)), m.group(3)
    if kind == "fixed_size_list":
        if size is None:
            raise ValueError(f"{spec!r}: fixed_size_list needs a [size]")
        return pa.list_(inner, int(size))
    return pa.large_list(inner) if kind == "large_list" else pa.list_(inner)


@dataclass(frozen=True)
class TableSchema:
    name: str
    version: int
    key: tuple[str, ...]
    arrow: pa.Schema
    description: str = ""

    def validate(self, batch: pa.Table | pa.RecordBatch) -> pa.Table:
        """Return ``batch`` as a Table in exactly this schema (safe casts only) or raise SchemaError."""
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        missing = [f.name for f in self.arrow if f.name not in table.column_names]
        if missing:
            raise SchemaError(f"table {self.name}: missing column(s) {missing}; expected {self.arrow.names}")
        extra = [c for c in table.column_names if c not in self.arrow.names]
        if extra:
            raise SchemaError(f"table {self.name}: unknown column(s) {extra}; expected {self.arrow.names}")
        columns = []
        for f in self.arrow:
            col = table.column(f.name)
            if not f.nullable and col.null_count:
                row = _first_null(col)
                raise SchemaError(f"table {self.name}: column {f.name!r} is null at row {row}; it is required")
            if col.type != f.type:
                try:
                    col = col.cast(f.type, safe=True)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                    raise SchemaError(f"table {self.name}: column {f.name!r} of type {col.type} cannot be "
                                      f"stored as {f.type}: {e}") from None
            columns.append(col)
        return pa.Table.from_arrays(columns, schema=self.arrow)


def _first_null(col: pa.ChunkedArray) -> int:
    offset = 0
    for chunk in col.chunks:
        if chunk.null_count:
            mask = chunk.is_null().to_numpy(zero_copy_only=False)
            return offset + int(mask.argmax())
        offset += len(chunk)
    return -1


@lru_cache(maxsize=None)
def load_schema(table: str, dim: int | None = None) -> TableSchema:
    """The schema of ``table`` as declared in ``schemas/<table>.json``; a family whose vector width varies by table
    (``fixed_size_list<float32>[{dim}]``, e.g. ``knn_bank``) is instantiated with ``dim``."""
    try:
        text = resources.files("spg_dist.schemas").joinpath(f"{table}.json").read_text()
    except FileNotFoundError:
        raise SchemaError(f"no schema file for table {table!r}; known tables: {known_tables()}") from None
    doc = json.loads(text)
    templated = any("{dim}" in f["type"] for f in doc["fields"])
    if templated and dim is None:
        raise SchemaError(f"table family {table!r} needs a vector width: load_schema({table!r}, dim=D)")
    fields = [
        pa.field(f["name"], parse_type(f["type"].replace("{dim}", str(dim)) if templated else f["type"]),
                 nullable=f.get("nullable", True), metadata={b"doc": f.get("doc", "").encode()})
        for f in doc["fields"]
    ]
    meta = {VERSION_KEY: str(doc["version"]).encode(), TABLE_KEY: doc["table"].encode(),
            b"spg.key": ",".join(doc["key"]).encode()}
    return TableSchema(doc["table"], int(doc["version"]), tuple(doc["key"]), pa.schema(fields, metadata=meta),
                       doc.get("description", ""))


def known_tables() -> list[str]:
    """Tables with one fixed schema (families of per-width tables such as ``knn_bank`` are listed by
    :func:`table_families`)."""
    return sorted(p.name[:-5] for p in resources.files("spg_dist.schemas").iterdir()
                  if p.name.endswith(".json") and "{dim}" not in p.read_text())


def table_families() -> list[str]:
    """Schema files that describe a family of tables named ``<family>_<id>`` (one vector width each)."""
    return sorted(p.name[:-5] for p in resources.files("spg_dist.schemas").iterdir()
                  if p.name.endswith(".json") and "{dim}" in p.read_text())
