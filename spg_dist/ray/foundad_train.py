"""FoundAD's projector trained data-parallel on Ray Train (``TorchTrainer``, DDP; gloo on CPU, nccl on GPU).

The same model, loss and optimizer as :func:`spg_dist.detectors.foundad.train_projector`; each of ``workers``
workers takes its shard of the (clean, corrupted) pairs (pair ``i`` goes to rank ``i % world``), a batch of
``batch_images // world`` pairs per step (so the averaged DDP gradient is that of one ``batch_images`` batch), and
the per-batch identity coin comes from ``(seed, step)`` alone, so every rank trains on identity pairs at the same
steps. The pairs reach the workers as Ray object refs (they are small). Rank 0 writes the trained weights as
safetensors into a Ray Train checkpoint (no pickled model), the driver loads them back and checks them against the
digest rank 0 reported and that DDP kept every rank's weights equal.

Plug it into the detector with ``detector.trainer_fn = ray_trainer(workers=2)``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import types
import uuid
from typing import Any, Callable

import numpy as np
import torch

from spg_dist.detectors.base import to_tensor
from spg_dist.detectors.foundad import (ManifoldProjector, batch_indices, build_projector, check_pairs,
                                        identity_coin)
from spg_dist.sae.serialization import load_file, save_file

WEIGHTS_FILE = "projector.safetensors"
SETTING_KEYS = ("width", "depth", "heads", "mlp_ratio", "input_dropout", "lr", "weight_decay", "batch_images",
                "steps", "identity_prob", "seed")


def param_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        a = t.detach().cpu().contiguous()
        h.update(f"{name}|{a.dtype}|{tuple(a.shape)}|".encode())
        h.update(a.numpy().tobytes())
    return h.hexdigest()


def _rank_seed(seed: int, rank: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * (rank + 1)) & 0x7FFF_FFFF_FFFF_FFFF


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    import torch.nn.functional as F

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    s = types.SimpleNamespace(**config["settings"])
    clean = torch.from_numpy(np.asarray(ray.get(config["clean"]))).to(device)
    corrupted = torch.from_numpy(np.asarray(ray.get(config["corrupted"]))).to(device)
    shard = torch.arange(rank, clean.shape[0], world)
    clean, corrupted = clean[shard], corrupted[shard]
    per_worker = max(1, int(s.batch_images) // world)

    torch.manual_seed(int(s.seed))  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model = build_projector(clean.shape[-1], s).to(device)
    torch.manual_seed(_rank_seed(s.seed, rank))  # dropout masks differ across ranks
    gen = torch.Generator().manual_seed(_rank_seed(s.seed, rank) + 1)
    ddp = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    opt = torch.optim.AdamW(ddp.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    ddp.train()
    batches = batch_indices(clean.shape[0], per_worker, gen)
    curve: list[dict[str, Any]] = []
    for step in range(int(s.steps)):
        idx = next(batches).to(device)
        identity = identity_coin(s.seed, step, s.identity_prob)
        target = clean[idx]
        loss = F.mse_loss(ddp(target if identity else corrupted[idx]), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        value = float(mean)
        if not np.isfinite(value):
            raise FloatingPointError(f"foundad: non-finite loss {value} at step {step}; lower lr")
        curve.append({"step": step + 1, "loss": value, "identity": identity})

    model.eval()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    agree = True
    if world > 1:
        hi, lo = flat.clone(), flat.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        agree = bool(torch.equal(hi, lo))
    metrics = {"step": int(s.steps), "loss": curve[-1]["loss"] if curve else float("nan"), "ranks_agree": agree}
    if rank == 0:
        digest = param_digest(model)
        with tempfile.TemporaryDirectory() as d:
            save_file(os.path.join(d, WEIGHTS_FILE), model.state_dict(),
                      {"arch": model.arch(), "curve": curve, "param_digest": digest, "world_size": world})
            ray.train.report({**metrics, "param_digest": digest}, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)


def load_projector(directory: str, input_dropout: float = 0.0) -> tuple[ManifoldProjector, dict[str, Any]]:
    """The projector in a checkpoint directory written by :func:`train_loop` (eval mode), and its metadata."""
    tensors, meta = load_file(os.path.join(directory, WEIGHTS_FILE))
    arch = meta["arch"]
    model = ManifoldProjector(int(arch["d"]), int(arch["width"]), int(arch["depth"]), int(arch["heads"]),
                              float(arch["mlp_ratio"]), input_dropout)
    model.load_state_dict(tensors, strict=True)
    return model.eval(), meta


def train_projector_ray(clean: Any, corrupted: Any, settings: Any, workers: int = 2, use_gpu: bool = False,
                        storage_path: str | None = None, *, cpus_per_worker: float = 1.0, run_name: str | None = None,
                        address: str | None = None,
                        num_cpus: int | None = None) -> tuple[ManifoldProjector, list[dict[str, Any]]]:
    """Train FoundAD's projector with DDP over ``workers`` Ray Train workers; returns ``(projector on the driver's
    CPU in eval mode, curve)`` like ``train_projector`` (the curve's loss is the mean over ranks). ``storage_path``:
    where Ray Train keeps the run (a temporary folder, removed afterwards, when None)."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from spg_dist.ray.runtime import ensure_ray

    clean_t, corr_t = to_tensor(clean), to_tensor(corrupted)
    check_pairs(clean_t, corr_t)
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    if clean_t.shape[0] < workers:
        raise ValueError(f"{clean_t.shape[0]} training pairs cannot be sharded over {workers} workers; use fewer")
    config = {k: getattr(settings, k) for k in SETTING_KEYS}
    ensure_ray(address, num_cpus)
    name = run_name or f"foundad-{uuid.uuid4().hex[:10]}"
    own_storage = storage_path is None
    storage = tempfile.mkdtemp(prefix="foundad-train-") if own_storage else os.path.abspath(storage_path)
    try:
        loop_config = {"settings": config, "use_gpu": use_gpu, "clean": ray.put(clean_t.numpy()),
                       "corrupted": ray.put(corr_t.numpy())}
        trainer = TorchTrainer(
            train_loop, train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                                   resources_per_worker=None if use_gpu else {"CPU": cpus_per_worker}),
            run_config=ray.train.RunConfig(name=name, storage_path=storage,
                                           checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"))
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"foundad training run {name} produced no checkpoint")
        with result.checkpoint.as_directory() as d:
            projector, meta = load_projector(d, float(settings.input_dropout))
    finally:
        if own_storage:
            shutil.rmtree(storage, ignore_errors=True)
    reported = (result.metrics or {}).get("param_digest")
    if param_digest(projector) != meta.get("param_digest") or (reported and reported != meta.get("param_digest")):
        raise RuntimeError(f"foundad training run {name}: the loaded projector differs from the one rank 0 saved")
    if not (result.metrics or {}).get("ranks_agree", True):
        raise RuntimeError(f"foundad training run {name}: DDP ranks ended with different weights")
    return projector, list(meta.get("curve", []))


def ray_trainer(workers: int = 2, use_gpu: bool = False, storage_path: str | None = None,
                **kwargs: Any) -> Callable[..., tuple[ManifoldProjector, list[dict[str, Any]]]]:
    """A ``FoundADDetector.trainer_fn`` that trains on Ray Train: ``(clean, corrupted, settings, device="cpu",
    on_step=None, generator=None)``. The projector comes back on ``device``; ``on_step`` sees the curve replayed
    after training (the workers cannot call back per step); ``generator`` is not used (each rank seeds its batch
    order from ``settings.seed`` and its rank)."""

    def train(clean: Any, corrupted: Any, settings: Any, device: str | torch.device = "cpu",
              on_step: Callable[[int, float], None] | None = None,
              generator: torch.Generator | None = None) -> tuple[ManifoldProjector, list[dict[str, Any]]]:
        projector, curve = train_projector_ray(clean, corrupted, settings, workers, use_gpu, storage_path, **kwargs)
        if on_step is not None:
            for point in curve:
                on_step(point["step"], point["loss"])
        return projector.to(device), curve

    return train


__all__ = ["WEIGHTS_FILE", "load_projector", "param_digest", "ray_trainer", "train_loop", "train_projector_ray"]
