"""``patch_tokens``: one row per (backbone, layer, image) holding the image's patch grid as a flat fp16 list.

This module owns the table: its name, its key, the typed selection every reader uses (:class:`TokenSelection`),
zero-copy conversion between rows and ``[n, h, w, d]`` arrays, metadata-only reads (grids, categories, counts,
without touching token bytes), streaming readers, and the fragment path bulk writers commit through.

A batch of rows with equal grid shape is one contiguous fp16 buffer, so reading N images is a reshape of the
list's value buffer, not N copies.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from spg_dist.errors import NoTokensError
from spg_dist.store.connection import Store
from spg_dist.store.filters import where
from spg_dist.store.schemas import load_schema

TABLE = "patch_tokens"
META_COLUMNS = ("backbone", "layer", "token", "image_id", "dataset", "category", "split", "label", "source_image_id",
                "image_size", "grid_h", "grid_w", "dim")
TOKEN_CHOICES = ("block", "norm")  # a block's output, or after the model's final norm


def _names(v: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if v is None:
        return None
    return (v,) if isinstance(v, str) else tuple(v)


@dataclass(frozen=True)
class TokenSelection:
    """Which stored tokens a stage reads: one backbone and layer, optionally narrowed to datasets, categories,
    a split, a label or explicit images. Its SQL is built by :func:`spg_dist.store.filters.where`, so user values
    are always literals. Rows of corrupted copies (``source_image_id`` set) are left out unless ``sources`` names
    the clean images whose copies are wanted."""

    backbone: str
    layer: int | None  # None: every stored layer (planning reads)
    dataset: tuple[str, ...] | None = None
    category: tuple[str, ...] | None = None
    split: str | None = None
    label: int | None = None
    image_ids: tuple[str, ...] | None = None
    sources: tuple[str, ...] | None = None  # corrupted copies of these clean images (only them)

    @classmethod
    def of(cls, backbone: str, layer: int | None, *, dataset: str | Sequence[str] | None = None,
           category: str | Sequence[str] | None = None, split: str | None = None, label: int | None = None,
           image_ids: Sequence[str] | None = None, sources: Sequence[str] | None = None) -> "TokenSelection":
        return cls(backbone, None if layer is None else int(layer), _names(dataset), _names(category), split, label,
                   tuple(image_ids) if image_ids is not None else None,
                   tuple(sources) if sources is not None else None)

    def where(self) -> str:
        return where(backbone=self.backbone, layer=self.layer,
                     dataset=list(self.dataset) if self.dataset else None,
                     category=list(self.category) if self.category else None, split=self.split, label=self.label,
                     image_id=list(self.image_ids) if self.image_ids is not None else None,
                     source_image_id=list(self.sources) if self.sources is not None else "") or "true"

    def describe(self) -> str:
        parts = [f"{self.backbone} layer {self.layer}"]
        if self.dataset:
            parts.append("dataset " + "+".join(self.dataset))
        if self.category:
            parts.append("categories " + ",".join(self.category))
        if self.split:
            parts.append(f"split {self.split}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "layer": self.layer, "dataset": list(self.dataset or []),
                "category": list(self.category or []), "split": self.split}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenSelection":
        return cls(d["backbone"], int(d["layer"]), tuple(d.get("dataset") or ()) or None,
                   tuple(d.get("category") or ()) or None, d.get("split"))


# --------------------------------------------------------------------------------------------- rows <-> arrays
def tokens_to_arrow(meta: dict[str, Sequence[Any]], tokens: np.ndarray, weights: str,
                    created_at: _dt.datetime | None = None) -> pa.Table:
    """Rows of ``patch_tokens`` from per-row metadata columns and a [n, h, w, d] array (cast to fp16); ``token``
    defaults to "block" and ``source_image_id`` to "" (an image of the dataset)."""
    n, h, w, d = tokens.shape
    flat = np.ascontiguousarray(tokens, dtype=np.float16).reshape(-1)
    offsets = pa.array(np.arange(n + 1, dtype=np.int64) * (h * w * d))
    token_col = pa.LargeListArray.from_arrays(offsets, pa.array(flat, type=pa.float16()))
    now = created_at or _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)
    cols = {k: meta[k] for k in ("backbone", "layer", "image_id", "dataset", "category", "split", "label")}
    cols.update(token=meta.get("token", ["block"] * n), source_image_id=meta.get("source_image_id", [""] * n),
                image_size=meta["image_size"], grid_h=[h] * n, grid_w=[w] * n, dim=[d] * n,
                tokens=token_col, weights=[weights] * n, created_at=[now] * n)
    return load_schema(TABLE).validate(pa.table(cols))


def flat_values(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The values of a list column as one NumPy array, without the copy ``combine_chunks`` makes of one chunk."""
    if isinstance(col, pa.ChunkedArray):
        parts = [c.flatten().to_numpy(zero_copy_only=False) for c in col.chunks]
        return parts[0] if len(parts) == 1 else (np.concatenate(parts) if parts else np.zeros(0))
    return col.flatten().to_numpy(zero_copy_only=False)


def tokens_from_arrow(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """The ``tokens`` column of rows sharing one grid shape as a [n, h, w, d] fp16 array (zero-copy when possible)."""
    n = table.num_rows
    if n == 0:
        return np.zeros((0, 0, 0, 0), np.float16)
    shapes = {(int(h), int(w), int(d)) for h, w, d in zip(table.column("grid_h").to_pylist(),
                                                            table.column("grid_w").to_pylist(),
                                                            table.column("dim").to_pylist())}
    if len(shapes) != 1:
        raise NoTokensError(f"rows have different token grids {sorted(shapes)}; filter to one backbone, layer "
                            "and image size")
    return flat_values(table.column("tokens")).reshape(n, *shapes.pop())


# ---------------------------------------------------------------------------------------------------- reads
def scan(store: Store, selection: TokenSelection | None = None, columns: Sequence[str] | None = None,
         where_sql: str | None = None) -> pa.Table:
    """One multi-threaded scan of the table (metadata or tokens, as ``columns`` say), in one Arrow table."""
    filt = where(selection.where() if selection else None, where_sql)
    return store.read(TABLE, where=filt, columns=columns)


def metadata(store: Store, selection: TokenSelection, columns: Sequence[str] = META_COLUMNS) -> pa.Table:
    """Metadata of the selected rows (no token bytes), sorted by image_id: what stages plan from."""
    t = scan(store, selection, list(dict.fromkeys(columns)))
    return t.sort_by("image_id") if t.num_rows and "image_id" in t.column_names else t


def grid_of(meta: pa.Table, what: str = "the selected tokens") -> tuple[int, int]:
    """(grid_h, grid_w) of metadata rows that must share one grid."""
    shapes = set(zip(meta.column("grid_h").to_pylist(), meta.column("grid_w").to_pylist()))
    if len(shapes) != 1:
        raise NoTokensError(f"{what} come in several grids {sorted(shapes)}; extract at one image size")
    h, w = shapes.pop()
    return int(h), int(w)


def inventory(store: Store) -> pa.Table:
    """(backbone, layer, dataset, rows) of everything stored: what error messages list as available."""
    if not store.has_table(TABLE):
        return pa.table({"backbone": pa.array([], pa.string()), "layer": pa.array([], pa.int16()),
                         "dataset": pa.array([], pa.string()), "rows": pa.array([], pa.int64())})
    t = store.read(TABLE, columns=["backbone", "layer", "dataset"])
    g = t.group_by(["backbone", "layer", "dataset"]).aggregate([([], "count_all")])
    return g.rename_columns(["backbone", "layer", "dataset", "rows"]).sort_by(
        [("backbone", "ascending"), ("layer", "ascending"), ("dataset", "ascending")])


def describe_inventory(store: Store) -> str:
    rows = inventory(store).to_pylist()
    if not rows:
        return "no tokens"
    return "; ".join(f"{r['backbone']} layer {r['layer']} {r['dataset']} ({r['rows']} images)" for r in rows)


def require(store: Store, selection: TokenSelection, what: str = "tokens",
            columns: Sequence[str] = META_COLUMNS) -> pa.Table:
    """:func:`metadata`, or a :class:`NoTokensError` saying what the store holds and what to extract."""
    meta = metadata(store, selection, columns)
    if meta.num_rows == 0:
        raise NoTokensError(f"no {what} for {selection.describe()} in {store.uri}; the store holds "
                            f"{describe_inventory(store)} (run `spg extract --backbone {selection.backbone.split('@')[0]}"
                            f" --layers {selection.layer}` on that dataset first)")
    return meta


def stored_layers(store: Store, backbone: str) -> list[int]:
    t = store.read(TABLE, where=where(backbone=backbone), columns=["layer"])
    return sorted({int(v) for v in t.column("layer").to_pylist()})


def resolve_layer(store: Store, backbone: str, layer: int) -> int:
    """A stored layer; ``-1`` (``-2``…) counts from the deepest stored one."""
    if layer >= 0:
        return int(layer)
    layers = stored_layers(store, backbone)
    if not layers:
        raise NoTokensError(f"no patch_tokens for backbone {backbone!r} in {store.uri}; the store holds "
                            f"{describe_inventory(store)} (run `spg extract` first)")
    if -layer > len(layers):
        raise NoTokensError(f"layer {layer}: backbone {backbone!r} has only layers {layers} stored")
    return layers[layer]


def corrupted_metadata(store: Store, backbone: str, layer: int, sources: Sequence[str]) -> pa.Table:
    """Metadata of the stored corrupted copies of ``sources`` (clean image ids), sorted by image_id."""
    return metadata(store, TokenSelection.of(backbone, layer, sources=sources))


def stored_keys(store: Store, backbone: str, layers: Sequence[int]) -> set[tuple[str, int, str]]:
    return store.keys(TABLE, where=where(backbone=backbone, layer=[int(x) for x in layers]))


def dedupe(store: Store, backbone: str, layers: Sequence[int], expected: int) -> int:
    """Remove rows of keys stored more than once (an older version, or a writer outside the commit protocol);
    ``expected`` is the number of distinct keys already read, so the usual case costs one count."""
    filt = where(backbone=backbone, layer=[int(x) for x in layers])
    if not store.has_table(TABLE) or store.count(TABLE, filt) <= expected:
        return 0
    return store.dedupe(TABLE, filt)


def iter_tokens(store: Store, backbone: str | TokenSelection, layer: int | None = None, *,
                dataset: str | Sequence[str] | None = None, category: str | Sequence[str] | None = None,
                split: str | None = None, label: int | None = None, image_ids: Sequence[str] | None = None,
                batch_size: int = 256, columns: Sequence[str] = META_COLUMNS
                ) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """Stream (metadata, tokens[n, h, w, d]) batches of one backbone/layer, in bounded memory."""
    sel = backbone if isinstance(backbone, TokenSelection) else TokenSelection.of(
        backbone, int(layer), dataset=dataset, category=category, split=split, label=label, image_ids=image_ids)
    if not store.has_table(TABLE):
        return
    ds = store.lance(TABLE)
    batches = ds.to_batches(columns=list(dict.fromkeys([*columns, "grid_h", "grid_w", "dim", "tokens"])),
                            filter=sel.where(), batch_size=batch_size)
    while True:
        with store.reading(TABLE):
            batch = next(batches, None)
        if batch is None:
            return
        if batch.num_rows:
            tbl = pa.Table.from_batches([batch])
            yield tbl.drop_columns(["tokens"]), tokens_from_arrow(tbl)


def load_tokens(store: Store, backbone: str | TokenSelection, layer: int | None = None, **filters: Any
                ) -> tuple[pa.Table, np.ndarray]:
    """All matching rows at once: (metadata table, tokens[N, h, w, d] fp16), sorted by image_id."""
    metas, arrays = [], []
    for meta, toks in iter_tokens(store, backbone, layer, **filters):
        metas.append(meta)
        arrays.append(toks)
    if not metas:
        return pa.table({c: [] for c in META_COLUMNS}), np.zeros((0, 0, 0, 0), np.float16)
    meta = pa.concat_tables(metas)
    toks = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    order = np.argsort(np.asarray(meta.column("image_id").to_pylist(), dtype=object), kind="stable")
    return meta.take(pa.array(order)), toks[order]


# --------------------------------------------------------------------------------------------------- writes
def lance_uri(store: Store) -> str:
    """Where fragment writers put their data files (next to the table)."""
    return store.lance_uri(TABLE)


def compact(store: Store) -> bool:
    """Merge small fragments into larger files (Lance ``compact_files``); a conflict with a concurrent writer is not
    an error (the next run compacts). Returns whether it ran."""
    from lance.commit import CommitConflictError

    if not store.has_table(TABLE):
        return False
    try:
        store.lance(TABLE).optimize.compact_files(target_rows_per_fragment=4096)
        return True
    except (CommitConflictError, OSError):
        return False


def commit(store: Store, fragments: Sequence[str]) -> int:
    """Commit fragments written by :func:`spg_dist.store.write_fragment` for this table; returns rows added."""
    return store.commit_fragments(TABLE, fragments)


__all__ = ["META_COLUMNS", "TABLE", "TOKEN_CHOICES", "TokenSelection", "commit", "compact", "corrupted_metadata", "describe_inventory", "flat_values", "grid_of",
           "inventory", "iter_tokens", "lance_uri", "load_tokens", "metadata", "require", "resolve_layer", "scan",
           "stored_keys", "stored_layers", "tokens_from_arrow", "tokens_to_arrow"]
