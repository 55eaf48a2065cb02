"""``guides``: one row per learned guide pair (SAE, auxiliary data, config, sparse EMA coefficients, curve)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from spg_dist.errors import UnknownNameError
from spg_dist.store.connection import Store
from spg_dist.store.filters import where

TABLE = "guides"
_LISTS = ("normal_indices", "normal_values", "anomaly_indices", "anomaly_values")


class UnknownGuidesError(UnknownNameError):
    """No ``guides`` row with that id; the message lists the ids that exist."""


def find(store: Store, guide_id: str) -> dict[str, Any] | None:
    tbl = store.read(TABLE, where=where(guide_id=guide_id))
    return tbl.to_pylist()[0] if tbl.num_rows else None


def get(store: Store, guide_id: str) -> dict[str, Any]:
    row = find(store, guide_id)
    if row is None:
        known = sorted(store.read(TABLE, columns=["guide_id"]).column("guide_id").to_pylist())
        raise UnknownGuidesError(f"no guides {guide_id!r} in {store.uri}; known: {', '.join(known[:8]) or 'none'}"
                                 f"{' …' if len(known) > 8 else ''} (train them with `spg train-guides`)")
    return row


def put(store: Store, row: dict[str, Any]) -> None:
    """Upsert one row; the four coefficient lists are stored as ``large_list`` columns."""
    cols = {k: (pa.array([list(v)], pa.large_list(pa.int32() if k.endswith("indices") else pa.float32()))
                if k in _LISTS else [v]) for k, v in row.items()}
    store.upsert(TABLE, pa.table(cols))


def ids(store: Store) -> list[str]:
    return sorted(store.read(TABLE, columns=["guide_id"]).column("guide_id").to_pylist())


__all__ = ["TABLE", "UnknownGuidesError", "find", "get", "ids", "put"]
