"""Stage 2 of SPG on the driver (pure PyTorch, no Ray): guides over a frozen SAE, trained on auxiliary data and
kept in the ``guides`` table, and the SPG detector rebuilt from a stored row.

* :func:`train_guides` — frozen SAE + every token and mask of the auxiliary dataset(s) -> one ``guides`` row (sparse
  EMA coefficients, active sets, curve). Idempotent: the guide id hashes the SAE, the auxiliary data and the config,
  and an id already stored is returned without training.
* :func:`load_spg` — the :class:`~spg_dist.detectors.spg.SPGDetector` of a stored guide pair, ready to score.

Both are small (two coefficient vectors; one forward per image), so they run where the store is read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from spg_dist.detectors.base import FitData
from spg_dist.detectors.spg import SPGDetector
from spg_dist.guides import GuideConfig
from spg_dist.sae import TopKSAE
from spg_dist.stages.evaluate import utc_now
from spg_dist.stages.inputs import MASK_SCALE, InputSource
from spg_dist.store import Store, guides, sae_models, tokens
from spg_dist.store.tokens import TokenSelection


@dataclass
class GuidesResult:
    """What ``spg train-guides`` produced (or found already stored, ``reused``)."""

    guide_id: str
    sae_id: str
    aux: list[str]
    active_normal: int
    active_anomaly: int
    steps: int
    reused: bool
    row: dict[str, Any]

    @property
    def anomaly_atoms(self) -> list[tuple[int, float]]:
        """(atom, coefficient) of the anomaly guide, strongest first."""
        pairs = zip(self.row["anomaly_indices"], self.row["anomaly_values"])
        return sorted(((int(a), float(v)) for a, v in pairs), key=lambda p: -p[1])


def _datasets(aux: str | Sequence[str]) -> list[str]:
    names = sorted(dict.fromkeys([aux] if isinstance(aux, str) else list(aux)))
    if not names or any(not isinstance(n, str) or not n for n in names):
        raise ValueError(f"aux must be a dataset name or a non-empty list of names, got {aux!r}")
    return names


def guide_id_for(sae_id: str, aux: Sequence[str], config: GuideConfig, mask_size: int) -> str:
    payload = json.dumps({"guide": config.to_dict(), "mask_size": int(mask_size)}, sort_keys=True)
    return f"{sae_id}/guides-{'+'.join(aux)}-{hashlib.sha1(payload.encode()).hexdigest()[:10]}"


def load_sae(store: Store, sae_id: str, device: str = "cpu") -> tuple[TopKSAE, dict[str, Any]]:
    """The frozen SAE of ``sae_id`` (eval mode, its preprocessing included) and its row (read once)."""
    row = sae_models.get(store, sae_id)
    return TopKSAE.from_bytes(row["weights"]).to(device).eval(), row


def _result(row: dict[str, Any], reused: bool) -> GuidesResult:
    return GuidesResult(row["guide_id"], row["sae_id"], row["aux_dataset"].split("+"), int(row["active_normal"]),
                        int(row["active_anomaly"]), int(row["steps"]), reused, row)


def train_guides(store: Store | str, sae_id: str, aux: str | Sequence[str], config: GuideConfig | None = None,
                 mask_size: int | None = None, device: str | None = None,
                 on_step: Callable[[dict[str, Any]], None] | None = None) -> GuidesResult:
    """Train a guide pair on the auxiliary dataset(s) over the frozen SAE ``sae_id`` and store it (a guide id already
    stored is returned as it is)."""
    store = store if isinstance(store, Store) else Store(store)
    config = config or GuideConfig()
    aux = _datasets(aux)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = sae_models.get(store, sae_id, with_weights=False)
    backbone, layer = info["backbone"], int(info["layer"])
    meta = tokens.require(store, TokenSelection.of(backbone, layer, dataset=aux), "auxiliary tokens",
                          ["grid_h", "grid_w"])
    mask_size = int(mask_size or MASK_SCALE * max(tokens.grid_of(meta)))
    guide_id = guide_id_for(sae_id, aux, config, mask_size)
    if (row := guides.find(store, guide_id)) is not None:
        return _result(row, reused=True)

    sae, _ = load_sae(store, sae_id, device)
    source = InputSource(store, backbone, [layer], target="", aux=aux)
    detector = SPGDetector(device=device).attach(sae, layer, config)
    detector.fit(FitData(aux=source.aux_set(mask_size)), on_step=on_step)
    z = detector.coefficients()
    n_idx, a_idx = torch.nonzero(z[0] > 0).flatten(), torch.nonzero(z[1] > 0).flatten()
    aux_images = len(source.meta(aux[0], None)) if len(aux) == 1 else sum(len(source.meta(a, None)) for a in aux)
    row = dict(guide_id=guide_id, sae_id=sae_id, aux_dataset="+".join(aux),
               config=json.dumps({"guide": config.to_dict(), "mask_size": mask_size, "backbone": backbone,
                                  "layer": layer, "aux_images": aux_images}, sort_keys=True),
               normal_indices=n_idx.tolist(), normal_values=z[0, n_idx].tolist(),
               anomaly_indices=a_idx.tolist(), anomaly_values=z[1, a_idx].tolist(),
               active_normal=len(n_idx), active_anomaly=len(a_idx), steps=detector.steps_done,
               curve=json.dumps(detector.curve), created_at=utc_now())
    guides.put(store, row)
    return _result(guides.get(store, guide_id), reused=False)


def load_spg(store: Store, guide_id: str, device: str = "cpu", **overrides: Any) -> tuple[SPGDetector, dict]:
    """The SPG detector of stored guides (EMA coefficients, SAE frozen, eval mode) and the guides row."""
    row = guides.get(store, guide_id)
    info = json.loads(row["config"])
    config = GuideConfig.from_dict(info["guide"])
    sae, sae_row = load_sae(store, row["sae_id"], device)
    detector = SPGDetector(device=device, guides=guide_id, sae=row["sae_id"], mask_size=info.get("mask_size"),
                           **overrides)
    detector.attach(sae, int(sae_row["layer"]), config)
    z = torch.zeros(2, sae.C)
    for r, (i, v) in enumerate(((row["normal_indices"], row["normal_values"]),
                                (row["anomaly_indices"], row["anomaly_values"]))):
        z[r, torch.as_tensor(i, dtype=torch.long)] = torch.as_tensor(v, dtype=torch.float32)
    detector.load_state_dict({"coefficients": z})
    return detector, {**row, "backbone": sae_row["backbone"], "layer": int(sae_row["layer"]),
                      "sae_datasets": sae_datasets(sae_row)}


def sae_datasets(row: dict[str, Any]) -> list[str]:
    """The datasets an SAE was trained on, as recorded with it (older rows: the dataset filter, if any)."""
    flt = json.loads(row.get("config") or "{}").get("filter", {})
    return sorted(flt.get("datasets_seen") or flt.get("dataset") or [])


__all__ = ["GuidesResult", "guide_id_for", "load_sae", "load_spg", "sae_datasets", "train_guides"]
