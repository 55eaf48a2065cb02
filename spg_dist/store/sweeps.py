"""``sweep_trials``: one row per (sweep, trial): resolved settings, status, Ray node, start, end, error."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import pyarrow as pa

from spg_dist.store.connection import Store
from spg_dist.store.filters import where

TABLE = "sweep_trials"
STATUSES = ("pending", "running", "finished", "failed")


def upsert(store: Store, rows: Iterable[dict[str, Any]]) -> int:
    return store.upsert(TABLE, list(rows))


def trials(store: Store, sweep_id: str, status: str | Sequence[str] | None = None,
           columns: Sequence[str] | None = None) -> pa.Table:
    st = list(status) if isinstance(status, (list, tuple, set)) else status
    return store.read(TABLE, where=where(sweep_id=sweep_id, status=st), columns=list(columns) if columns else None)


def sweep_ids(store: Store) -> list[str]:
    return sorted(set(store.read(TABLE, columns=["sweep_id"]).column("sweep_id").to_pylist()))


__all__ = ["STATUSES", "TABLE", "sweep_ids", "trials", "upsert"]
