"""All of spg_dist's Ray code, and nothing else: Ray Data pipelines (extraction, encoding), Ray Train loops (SAEs,
the FoundAD projector), sweeps, and cluster concerns (joining or starting a runtime).

Every stage function here takes the store first and wraps the pure method modules (``sae``, ``guides``,
``detectors``, ``evaluation``), which never import Ray. Names resolve lazily: a Ray worker that unpickles
``spg_dist.ray.sae_worker.train_loop`` imports that module only, not every pipeline.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"EncodeResult": "encode", "encode": "encode", "ExtractResult": "extract", "extract": "extract",
            "ensure_ray": "runtime", "TrainSAEResult": "train_sae", "train_saes": "train_sae"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"spg_dist.ray.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'spg_dist.ray' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
