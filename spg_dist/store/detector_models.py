"""``detector_models``: fitted detector states (safetensors bytes) keyed by detector, settings and fit data."""

from __future__ import annotations

from typing import Any

from spg_dist.store.connection import Store
from spg_dist.store.filters import where

TABLE = "detector_models"


def find(store: Store, model_id: str) -> dict[str, Any] | None:
    t = store.read(TABLE, where=where(model_id=model_id))
    return t.to_pylist()[0] if t.num_rows else None


def put(store: Store, row: dict[str, Any]) -> None:
    store.upsert(TABLE, [row])


__all__ = ["TABLE", "find", "put"]
