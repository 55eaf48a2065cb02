"""Patch tokens in and out of Arrow: zero-copy conversion, filters, and streaming readers (NumPy, torch).

A ``patch_tokens`` row holds one image's grid as a flat fp16 list; a batch of rows with equal grid shape is
one contiguous fp16 buffer, so reading N images is a reshape of the list's value buffer, not N copies.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from spg_dist.store.connection import Store
from spg_dist.store.schemas import load_schema

META_COLUMNS = ("backbone", "layer", "image_id", "dataset", "category", "split", "label",
                "image_size", "grid_h", "grid_w", "dim")


def sql_literal(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(int(value)) if isinstance(value, (bool, np.integer, int)) else repr(value)


def where_clause(**filters: Any) -> str | None:
    """``where_clause(backbone="b", category=["a","b"], split=None)`` -> "backbone = 'b' AND category IN (...)"."""
    parts = []
    for col, val in filters.items():
        if val is None:
            continue
        if isinstance(val, (list, tuple, set, frozenset)):
            vals = sorted(val)
            if not vals:
                return "false"
            parts.append(f"{col} IN ({', '.join(sql_literal(v) for v in vals)})")
        else:
            parts.append(f"{col} = {sql_literal(val)}")
    return " AND ".join(parts) or None


def tokens_to_arrow(meta: dict[str, Sequence[Any]], tokens: np.ndarray, weights: str,
                    created_at: _dt.datetime | None = None) -> pa.Table:
    """Rows of ``patch_tokens`` from per-row metadata columns and a [n, h, w, d] array (cast to fp16)."""
    n, h, w, d = tokens.shape
    flat = np.ascontiguousarray(tokens, dtype=np.float16).reshape(-1)
    offsets = pa.array(np.arange(n + 1, dtype=np.int64) * (h * w * d))
    token_col = pa.LargeListArray.from_arrays(offsets, pa.array(flat, type=pa.float16()))
    now = created_at or _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)
    cols = {k: meta[k] for k in ("backbone", "layer", "image_id", "dataset", "category", "split", "label")}
    cols.update(image_size=meta["image_size"], grid_h=[h] * n, grid_w=[w] * n, dim=[d] * n,
                tokens=token_col, weights=[weights] * n, created_at=[now] * n)
    return load_schema("patch_tokens").validate(pa.table(cols))


def tokens_from_arrow(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """The ``tokens`` column of rows sharing one grid shape as a [n, h, w, d] fp16 array (zero-copy when possible)."""
    n = table.num_rows
    if n == 0:
        return np.zeros((0, 0, 0, 0), np.float16)
    shapes = {(int(h), int(w), int(d)) for h, w, d in zip(table.column("grid_h").to_pylist(),
                                                            table.column("grid_w").to_pylist(),
                                                            table.column("dim").to_pylist())}
    if len(shapes) != 1:
        raise ValueError(f"rows have different token grids {sorted(shapes)}; filter to one backbone and layer")
    col = table.column("tokens")
    if isinstance(col, pa.ChunkedArray):  # combine_chunks would copy even one chunk
        parts = [c.flatten().to_numpy(zero_copy_only=False) for c in col.chunks]
        values = parts[0] if len(parts) == 1 else np.concatenate(parts)
    else:
        values = col.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(n, *shapes.pop())


def iter_tokens(store: Store, backbone: str, layer: int, *, dataset: str | Sequence[str] | None = None,
                category: str | Sequence[str] | None = None, split: str | None = None,
                label: int | None = None, batch_size: int = 256,
                columns: Sequence[str] = META_COLUMNS) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """Stream (metadata, tokens[n, h, w, d]) batches of one backbone/layer, in bounded memory."""
    where = where_clause(backbone=backbone, layer=layer, dataset=_as_filter(dataset),
                         category=_as_filter(category), split=split, label=label)
    if not store.has_table("patch_tokens"):
        return
    ds = store.table("patch_tokens").to_lance()
    for batch in ds.to_batches(columns=list(dict.fromkeys([*columns, "grid_h", "grid_w", "dim", "tokens"])),
                               filter=where, batch_size=batch_size):
        if batch.num_rows:
            tbl = pa.Table.from_batches([batch])
            yield tbl.drop_columns(["tokens"]), tokens_from_arrow(tbl)


def load_tokens(store: Store, backbone: str, layer: int, **filters: Any) -> tuple[pa.Table, np.ndarray]:
    """All matching rows at once: (metadata table, tokens[N, h, w, d] fp16). Sorted by image_id."""
    metas, arrays = [], []
    for meta, toks in iter_tokens(store, backbone, layer, **filters):
        metas.append(meta)
        arrays.append(toks)
    if not metas:
        return pa.table({c: [] for c in META_COLUMNS}), np.zeros((0, 0, 0, 0), np.float16)
    meta = pa.concat_tables(metas)
    toks = np.concatenate(arrays)
    order = np.argsort(np.asarray(meta.column("image_id").to_pylist(), dtype=object), kind="stable")
    return meta.take(pa.array(order)), toks[order]


def _as_filter(v: str | Sequence[str] | None):
    return None if v is None else (v if isinstance(v, str) else list(v))
