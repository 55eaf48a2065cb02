"""Reading trained SAEs back from ``sae_models``: the row, and the model rebuilt from its safetensors bytes."""

from __future__ import annotations

from typing import Any

from spg_dist.store.connection import Store
from spg_dist.store.tokens import sql_literal


class UnknownSAEError(LookupError):
    """No ``sae_models`` row with that id; the message lists the ids that exist."""


def sae_row(store: Store, sae_id: str, with_weights: bool = True) -> dict[str, Any]:
    cols = None if with_weights else ["sae_id", "backbone", "layer", "d", "C", "k", "sparsifier", "run", "config",
                                      "metrics", "nmse", "explained_variance", "l0", "dead_fraction", "steps",
                                      "tokens_seen", "run_dir"]
    tbl = store.read("sae_models", where=f"sae_id = {sql_literal(sae_id)}", columns=cols)
    if tbl.num_rows == 0:
        known = store.read("sae_models", columns=["sae_id"]).column("sae_id").to_pylist()
        raise UnknownSAEError(f"no SAE {sae_id!r} in {store.uri}; known: {', '.join(sorted(known)) or 'none'} "
                              f"(train one with `spg train-sae`)")
    return tbl.to_pylist()[0]


def raw_token_dim(row: dict[str, Any]) -> int:
    """Dimension of the stored tokens an SAE reads: its ``d`` minus what its recorded preprocessing appends."""
    import json

    from spg_dist.sae import Preprocessing

    pre = Preprocessing.from_dict(json.loads(row["config"]).get("preprocessing"))
    return int(row["d"]) - pre.extra_dims


def list_saes(store: Store) -> list[dict[str, Any]]:
    return store.read("sae_models", columns=["sae_id", "backbone", "layer", "C", "k", "sparsifier", "nmse", "l0",
                                             "dead_fraction", "steps"]).to_pylist()


def load_sae(store: Store, sae_id: str, device: str = "cpu"):
    """The trained ``TopKSAE`` (eval mode) with its recorded token preprocessing."""
    from spg_dist.sae import TopKSAE

    return TopKSAE.from_bytes(sae_row(store, sae_id)["weights"]).to(device).eval()
