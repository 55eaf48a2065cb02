"""``sae_models``: one row per trained SAE (what it was trained on, config, metrics, safetensors weights).

Rows and bytes only: turning ``weights`` into a model is ``spg_dist.sae.TopKSAE.from_bytes``'s job, so the store
knows no method.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from spg_dist.errors import UnknownNameError
from spg_dist.store.connection import Store
from spg_dist.store.filters import where

TABLE = "sae_models"
# every column but the two byte columns: what listings and planning read
INFO_COLUMNS = ("sae_id", "backbone", "layer", "d", "C", "k", "sparsifier", "run", "config", "metrics", "nmse",
                "explained_variance", "l0", "dead_fraction", "steps", "tokens_seen", "run_dir", "created_at")


class UnknownSAEError(UnknownNameError):
    """No ``sae_models`` row with that id; the message lists the ids that exist."""


def get(store: Store, sae_id: str, with_weights: bool = True) -> dict[str, Any]:
    """The row of ``sae_id`` (weights included unless ``with_weights=False``), or :class:`UnknownSAEError`."""
    tbl = store.read(TABLE, where=where(sae_id=sae_id), columns=None if with_weights else list(INFO_COLUMNS))
    if tbl.num_rows == 0:
        known = sorted(store.read(TABLE, columns=["sae_id"]).column("sae_id").to_pylist())
        from difflib import get_close_matches

        close = get_close_matches(sae_id, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UnknownSAEError(f"no SAE {sae_id!r} in {store.uri}; {hint}known: {', '.join(known[:8]) or 'none'}"
                              f"{' …' if len(known) > 8 else ''} (train one with `spg train-sae`)")
    return tbl.to_pylist()[0]


def list_rows(store: Store, columns: Sequence[str] = ("sae_id", "backbone", "layer", "C", "k", "sparsifier",
                                                       "nmse", "l0", "dead_fraction", "steps")) -> list[dict]:
    return store.read(TABLE, columns=list(columns)).to_pylist()


def of_run(store: Store, run: str) -> list[dict[str, Any]]:
    """Registered rows of one training run (without bytes)."""
    return store.read(TABLE, where=where(run=run), columns=list(INFO_COLUMNS)).to_pylist()


def metrics_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """The row's ``metrics`` JSON as a dict (``{}`` when empty or unreadable)."""
    try:
        out = json.loads(row.get("metrics") or "{}")
    except (TypeError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def latent_record(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """The dead-latent record stored with the model (``metrics["latents"]``, written from
    ``DeadLatentTracker.record()`` at the end of training), with ``dead_mask`` decoded to bool ``[C]``; ``None``
    for rows registered before it was stored (then only the ``dead_fraction`` column is known).

    Dead has one definition in spg_dist: a latent that has not fired in the last ``dead_tokens`` training tokens
    (Gao et al. 2024); ``dead_fraction`` of the row, ``n_dead`` and the mask here are that same quantity.
    """
    rec = metrics_of(row).get("latents")
    if not isinstance(rec, dict) or "dead_mask" not in rec:
        return None
    rec = dict(rec)
    bits = np.frombuffer(base64.b64decode(rec["dead_mask"]), dtype=np.uint8)
    rec["dead_mask"] = np.unpackbits(bits, count=int(rec["C"]), bitorder="little").astype(bool)
    return rec


def upsert(store: Store, rows: pa.Table | Iterable[dict[str, Any]]) -> int:
    return store.upsert(TABLE, rows)


__all__ = ["INFO_COLUMNS", "TABLE", "UnknownSAEError", "get", "latent_record", "list_rows", "metrics_of", "of_run",
           "upsert"]
