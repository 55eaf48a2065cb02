"""``sae_codes`` (per SAE and image: every patch's TopK indices and values), ``atom_index`` (one row per non-zero
activation) and ``atom_top`` (per SAE and atom its strongest activations): what encoding writes.

``sae_codes`` is the source of truth; the other two are derived from it (queries live in :mod:`.atoms`). Bulk rows
arrive as fragments from encode workers and are committed here; ``atom_top`` is small and upserted.
"""

from __future__ import annotations

from typing import Sequence

import pyarrow as pa

from spg_dist.store.connection import Store
from spg_dist.store.filters import chunks, where

CODES = "sae_codes"
INDEX = "atom_index"
TOP = "atom_top"
TOP_SOURCE_COLUMNS = ("atom", "image_id", "category", "patch", "value")


def lance_uris(store: Store) -> dict[str, str]:
    """Where encode workers write their uncommitted fragments, per table."""
    return {CODES: store.lance_uri(CODES), INDEX: store.lance_uri(INDEX)}


def encoded_image_ids(store: Store, sae_id: str) -> set[str]:
    return {image_id for _, image_id in store.keys(CODES, where=where(sae_id=sae_id))}


def commit(store: Store, fragments: dict[str, Sequence[str]]) -> int:
    """Commit one window: ``atom_index`` first, then ``sae_codes``; a crash between the two leaves index rows
    without codes, which :func:`drop_atoms` removes before those images are encoded again."""
    store.commit_fragments(INDEX, fragments.get(INDEX, ()))
    return store.commit_fragments(CODES, fragments.get(CODES, ()))


def drop_atoms(store: Store, sae_id: str, image_ids: Sequence[str] | None = None) -> None:
    """Remove ``atom_index`` rows of ``sae_id`` (of ``image_ids`` only, when given) and, when all of them go,
    its ``atom_top`` rows too."""
    if not store.has_table(INDEX):
        return
    tbl = store.table(INDEX)
    if image_ids is None:
        tbl.delete(where(sae_id=sae_id))
        if store.has_table(TOP):
            store.table(TOP).delete(where(sae_id=sae_id))
        return
    for c in chunks(image_ids, 500):
        tbl.delete(where(sae_id=sae_id, image_id=c))


def grid_w(store: Store, sae_id: str) -> int | None:
    t = store.read(CODES, where=where(sae_id=sae_id), columns=["grid_w"])
    return int(t.column("grid_w")[0].as_py()) if t.num_rows else None


def read_top(store: Store, sae_id: str, columns: Sequence[str] = TOP_SOURCE_COLUMNS) -> pa.Table:
    return store.read(TOP, where=where(sae_id=sae_id), columns=list(columns))


def upsert_top(store: Store, rows: pa.Table) -> int:
    return store.upsert(TOP, rows)


__all__ = ["CODES", "INDEX", "TOP", "TOP_SOURCE_COLUMNS", "commit", "drop_atoms", "encoded_image_ids", "grid_w",
           "lance_uris", "read_top", "upsert_top"]
