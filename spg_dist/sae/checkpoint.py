"""Trainer checkpoints as a folder of safetensors files plus one JSON file (no pickle anywhere).

Layout of ``<dir>``::

    sae_000.safetensors ...   one per SAE, the exact format of TopKSAE.save (weights + config + preprocessing),
                              so a checkpoint's models can be registered or loaded without the trainer
    state.safetensors         optimizer moments and step counts, dead-latent trackers, generator state
    trainer.json              configs, TrainConfig, preprocessing, counters, optimizer hyperparameters, file list

Every file is written atomically and ``trainer.json`` last: it is the commit marker, a folder without it is
an incomplete checkpoint. Loading validates configs before touching any tensor, and raises
:class:`~spg_dist.sae.config.SAEConfigError` naming the difference when the checkpoint belongs to other SAEs.

This module is the one way in and out: :func:`save_checkpoint` and :func:`load_checkpoint` (into a given trainer,
or a new one built from the checkpoint alone). The trainer itself knows nothing of files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spg_dist.sae import serialization
from spg_dist.sae.config import SAEConfig, SAEConfigError, TrainConfig, config_diff
from spg_dist.sae.model import TopKSAE
from spg_dist.sae.preprocess import Preprocessing
from spg_dist.sae.trainer import MultiSAETrainer

TRAINER_JSON = "trainer.json"
STATE_FILE = "state.safetensors"


def sae_file(i: int) -> str:
    return f"sae_{i:03d}.safetensors"


def save_checkpoint(trainer: MultiSAETrainer, directory: str | os.PathLike) -> Path:
    """Write ``trainer.state_dict()`` into ``directory`` (created if needed); returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = trainer.state_dict()
    meta, tensors = state["meta"], state["tensors"]
    files = []
    for i, sae in enumerate(trainer.saes):
        sae.save(directory / sae_file(i))
        files.append(sae_file(i))
    rest = {name: t for name, t in tensors.items() if not name.startswith("sae.")}
    serialization.save_file(directory / STATE_FILE, rest, {"format": meta["format"]})
    serialization.write_json(directory / TRAINER_JSON, {**meta, "files": {"saes": files, "state": STATE_FILE}})
    return directory


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's JSON (configs, counters, ...) without reading tensors."""
    path = Path(directory) / TRAINER_JSON
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no {TRAINER_JSON} (not a checkpoint, or an incomplete one)")
    return json.loads(path.read_text())


def _read_state(directory: str | os.PathLike) -> dict[str, Any]:
    """``{"meta", "tensors"}`` as produced by ``MultiSAETrainer.state_dict`` (tensors on CPU)."""
    directory = Path(directory)
    meta = read_meta(directory)
    tensors: dict[str, Tensor] = {}
    state_tensors, _ = serialization.load_file(directory / meta["files"]["state"])
    tensors.update(state_tensors)
    for i, name in enumerate(meta["files"]["saes"]):
        sae_tensors, sae_meta = serialization.load_file(directory / name)
        if diff := config_diff(meta["configs"][i], sae_meta.get("config", {})):
            raise SAEConfigError(f"{directory / name}: model file does not match trainer.json SAE {i}: {'; '.join(diff)}")
        tensors.update({f"sae.{i}.{k}": v for k, v in sae_tensors.items()})
    return {"meta": meta, "tensors": tensors}


def load_checkpoint(directory: str | os.PathLike, trainer: MultiSAETrainer | None = None,
                    device: str | torch.device = "cpu") -> MultiSAETrainer:
    """Restore ``trainer`` from ``directory`` (configs are checked from the JSON alone, before any tensor is read),
    or, without a trainer, build one entirely from the checkpoint (configs, settings, preprocessing, state)."""
    meta = read_meta(directory)
    if trainer is None:
        trainer = MultiSAETrainer([SAEConfig.from_dict(c) for c in meta["configs"]], TrainConfig.from_dict(meta["train"]),
                                  Preprocessing.from_dict(meta["preprocessing"]), device=device)
    trainer.check_compatible(meta)
    trainer.load_state_dict(_read_state(directory))
    return trainer


def latent_record_from_run(run_dir: str | os.PathLike, sae_config: Any, steps: int | None = None) -> dict | None:
    """``DeadLatentTracker.record()`` of the SAE with config ``sae_config`` (dict or SAEConfig) as the newest
    checkpoint of a local ``run_dir`` holds it (at ``steps`` when given), reading only the tracker tensors; the
    threshold is the run's (TrainConfig override, else the SAE's). None when no such checkpoint is readable here
    (remote run_dir, pruned or other checkpoints): for SAEs registered before the record was stored with them."""
    from spg_dist.sae.tracker import DeadLatentTracker

    try:
        folders = [f for f in Path(run_dir).iterdir() if (f / TRAINER_JSON).is_file()]
    except OSError:
        return None
    found = []
    for folder in folders:
        try:
            meta = read_meta(folder)
            i = next(j for j, c in enumerate(meta["configs"]) if not config_diff(c, sae_config))
        except (OSError, ValueError, KeyError, StopIteration, SAEConfigError):
            continue
        if steps is None or int(meta["steps"][i]) == int(steps):
            found.append((int(meta["steps"][i]), str(folder), meta, i))
    for _, folder, meta, i in sorted(found, reverse=True):
        try:
            tensors, _ = serialization.load_file(Path(folder) / meta["files"]["state"])
            cfg = SAEConfig.from_dict(meta["configs"][i])
            tracker = DeadLatentTracker(cfg.C, (meta.get("train") or {}).get("dead_tokens") or cfg.dead_tokens)
            prefix = f"tracker.{i}."
            tracker.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        except (OSError, ValueError, KeyError, RuntimeError):
            continue
        return tracker.record()
    return None


def load_sae(directory: str | os.PathLike, i: int, device: str | None = None) -> TopKSAE:
    """SAE ``i`` of a checkpoint as a standalone model."""
    return TopKSAE.load(Path(directory) / read_meta(directory)["files"]["saes"][i], device=device)
