"""What every evaluation in the store shares (SPG's ``evaluate``, the training-free baselines, the study bench):
the token grid and ground-truth masks of a dataset, and one way to write and tabulate per-category metrics, so
every detector's rows in ``eval_results`` look the same."""

from __future__ import annotations

import datetime as _dt
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from spg_dist.data.imageio import load_mask
from spg_dist.evaluation import METRICS
from spg_dist.store.connection import Store
from spg_dist.store.tokens import where_clause

MASK_SCALE = 4  # default mask side = token grid side × 4: small and fast, enough for bilinear maps to matter


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


def token_grid(store: Store, backbone: str, layer: int, **filters: Any) -> tuple[int, int] | None:
    """(grid_h, grid_w) of the matching token rows (cheap metadata read), or None when there are none."""
    if not store.has_table("patch_tokens"):
        return None
    where = where_clause(backbone=backbone, layer=layer, **filters)
    tbl = store.read("patch_tokens", where=where, columns=["grid_h", "grid_w"])
    if tbl.num_rows == 0:
        return None
    shapes = set(zip(tbl.column("grid_h").to_pylist(), tbl.column("grid_w").to_pylist()))
    if len(shapes) != 1:
        raise ValueError(f"token rows of {backbone} L{layer} {filters} have several grids {sorted(shapes)}")
    return shapes.pop()


def mask_uris(store: Store, datasets: Sequence[str]) -> dict[str, str]:
    tbl = store.read("images", where=where_clause(dataset=list(datasets)), columns=["image_id", "mask_uri"])
    return dict(zip(tbl.column("image_id").to_pylist(), tbl.column("mask_uri").to_pylist()))


def load_masks(image_ids: Sequence[str], uris: dict[str, str], size: int) -> np.ndarray:
    """[N, size, size] uint8 masks; an image with no mask (or no ``images`` row) is all-normal."""
    out = np.zeros((len(image_ids), size, size), np.uint8)
    for i, image_id in enumerate(image_ids):
        uri = uris.get(image_id, "")
        if uri:
            out[i] = load_mask(uri, size)
    return out


def results_frame(results: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """Per-category metric dicts (``mean`` included) -> the table every evaluation returns (index ``category``)."""
    df = pd.DataFrame.from_dict(dict(results), orient="index")[list(METRICS)]
    df.index.name = "category"
    return df


def write_eval_results(store: Store, results: Mapping[str, Mapping[str, float]], *, run: str, detector: str,
                       target_dataset: str, pooling: str, guide_id: str = "", sae_id: str = "",
                       aux_dataset: str = "") -> None:
    """Upsert one ``eval_results`` row per (category, metric); a re-run of the same ``run`` replaces its rows."""
    now = utc_now()
    store.upsert("eval_results", [dict(run=run, detector=detector, guide_id=guide_id, sae_id=sae_id,
                                       aux_dataset=aux_dataset, target_dataset=target_dataset, category=cat,
                                       metric=m, value=float(r[m]), pooling=pooling, created_at=now)
                                  for cat, r in results.items() for m in METRICS])
