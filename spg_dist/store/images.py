"""``images`` (one row per readable image: where its file and mask are) and ``errors`` (inputs that could not be
processed, with the reason). Both are small and written by upsert on their keys, so a re-run updates rows."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import pyarrow as pa

from spg_dist.store.connection import Store
from spg_dist.store.filters import chunks, where

TABLE = "images"
ERRORS = "errors"
CORRUPTIONS = "corruptions"
COLUMNS = ("image_id", "dataset", "category", "split", "label", "defect_type", "image_uri", "mask_uri", "width",
           "height")


def upsert(store: Store, rows: pa.Table | Iterable[dict[str, Any]]) -> int:
    return store.upsert(TABLE, rows)


def upsert_errors(store: Store, rows: pa.Table | Iterable[dict[str, Any]]) -> int:
    return store.upsert(ERRORS, rows)


def rows(store: Store, *, dataset: str | Sequence[str] | None = None, image_ids: Sequence[str] | None = None,
         columns: Sequence[str] = COLUMNS) -> pa.Table:
    """``images`` rows of the given datasets and/or image ids (large id lists are read in chunks)."""
    ds = [dataset] if isinstance(dataset, str) else (list(dataset) if dataset is not None else None)
    if image_ids is None:
        return store.read(TABLE, where=where(dataset=ds), columns=list(columns))
    parts = [store.read(TABLE, where=where(dataset=ds, image_id=c), columns=list(columns))
             for c in chunks(image_ids)]
    return pa.concat_tables(parts) if parts else store.read(TABLE, where="false", columns=list(columns))


def uris(store: Store, datasets: str | Sequence[str]) -> dict[str, tuple[str, str]]:
    """``{image_id: (image_uri, mask_uri)}`` of whole datasets, in one read."""
    t = rows(store, dataset=datasets, columns=("image_id", "image_uri", "mask_uri"))
    return dict(zip(t.column("image_id").to_pylist(),
                    zip(t.column("image_uri").to_pylist(), t.column("mask_uri").to_pylist())))


def stored_ids(store: Store, image_ids: Sequence[str]) -> set[str]:
    """Which of ``image_ids`` have an ``images`` row."""
    return {k[0] for c in chunks(image_ids) for k in store.keys(TABLE, where=where(image_id=c))}


def datasets(store: Store) -> list[str]:
    """Names of every dataset with an ``images`` row (what ``--target``/``--aux`` accept)."""
    t = store.read(TABLE, columns=["dataset"])
    return sorted(set(t.column("dataset").to_pylist()))


def upsert_corruptions(store: Store, rows: pa.Table | Iterable[dict[str, Any]]) -> int:
    return store.upsert(CORRUPTIONS, rows)


def corruption_masks(store: Store, image_ids: Sequence[str]) -> dict[str, bytes]:
    """``{image_id: mask PNG bytes}`` of corrupted copies (the ``corruptions`` table)."""
    out: dict[str, bytes] = {}
    for c in chunks(image_ids):
        t = store.read(CORRUPTIONS, where=where(image_id=c), columns=["image_id", "mask_png"])
        out.update(zip(t.column("image_id").to_pylist(), t.column("mask_png").to_pylist()))
    return out


def errors(store: Store, *, stage: str | None = None, dataset: str | None = None) -> pa.Table:
    return store.read(ERRORS, where=where(stage=stage, dataset=dataset))


__all__ = ["COLUMNS", "CORRUPTIONS", "ERRORS", "TABLE", "corruption_masks", "upsert_corruptions", "datasets", "errors", "rows", "stored_ids", "upsert", "upsert_errors",
           "uris"]
