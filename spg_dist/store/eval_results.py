"""``eval_results``: one row per (run, detector, target dataset, category, metric), for every detector alike."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import pyarrow as pa

from spg_dist.store.connection import Store
from spg_dist.store.filters import where

TABLE = "eval_results"


def write(store: Store, rows: Iterable[dict[str, Any]]) -> int:
    """Upsert rows; a re-run of the same (run, detector, target, category, metric) replaces its value."""
    return store.upsert(TABLE, list(rows))


def read(store: Store, *, run: str | Sequence[str] | None = None, detector: str | Sequence[str] | None = None,
         target_dataset: str | None = None, category: str | None = None, metric: str | None = None,
         columns: Sequence[str] | None = None) -> pa.Table:
    listify = (lambda v: list(v) if isinstance(v, (list, tuple, set)) else v)
    return store.read(TABLE, where=where(run=listify(run), detector=listify(detector),
                                         target_dataset=target_dataset, category=category, metric=metric),
                      columns=list(columns) if columns else None)


def runs(store: Store) -> list[str]:
    return sorted(set(store.read(TABLE, columns=["run"]).column("run").to_pylist()))


__all__ = ["TABLE", "read", "runs", "write"]
