"""Stage 1 on Ray Train: several TopK SAEs fitted in one pass over the stored tokens, data-parallel (DDP).

One ``TorchTrainer`` run trains a whole (C, k, sparsifier) grid on the same batches. Workers read their shard
of ``patch_tokens`` straight from the store (held in device memory when it fits) or get a streaming split of a
Ray Dataset with a local shuffle buffer (when it does not). Every ``checkpoint_every`` steps rank 0 writes the
full training state (safetensors weights, optimizer and tracker tensors, the data position) as a Ray Train
checkpoint; a run started again with the same name and storage path resumes from the latest one. A non-finite
loss stops the run before the optimizer touches the weights, so the last checkpoint stays the last good state.
Finished SAEs are registered in ``sae_models``. This module is the driver side; the worker loop is
:mod:`spg_dist.ray.sae_worker`.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from spg_dist.errors import NoTokensError
from spg_dist.ray.sae_data import TokenStats, load_images, owner, stream_dataset, token_stats
from spg_dist.ray.sae_worker import (NONFINITE_FILE, POSITION_FILE, newest_good_checkpoint, train_local,
                                     train_loop)
from spg_dist.sae import (MultiSAETrainer, NonFiniteLossError, Preprocessing, SAEConfig, SAEConfigError,
                          TrainConfig)
from spg_dist.sae.checkpoint import load_checkpoint
from spg_dist.sae.preprocess import parse_steps
from spg_dist.store import Store, sae_models, tokens
from spg_dist.store.tokens import TokenSelection


@dataclass
class TrainSAEResult:
    """What ``spg train-sae`` did: the run (its name and checkpoint folder) and one ``sae_models`` row (without
    bytes) per SAE of the grid; ``reused`` when the run had finished before and nothing was trained."""

    run: str
    run_dir: str
    models: list[dict]
    reused: bool = False
    seconds: float = 0.0

    @property
    def sae_ids(self) -> list[str]:
        return [m["sae_id"] for m in self.models]


@dataclass
class SAERunSpec:
    """Everything that defines a training run; its hash names the run, so re-running the same command resumes."""

    store: str
    backbone: str
    layer: int
    configs: list[dict]
    train: dict
    preprocessing: dict
    filter: dict
    epochs: float | None = 1.0
    token_budget: int | None = None
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    data_mode: str = "auto"  # auto | memory | stream
    checkpoint_every: int = 200
    log_every: int = 50
    extra: dict = field(default_factory=dict)

    def run_name(self) -> str:
        key = {k: v for k, v in asdict(self).items() if k not in ("workers", "use_gpu", "cpus_per_worker", "extra",
                                                                   "log_every")}
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
        return f"sae-{self.backbone.replace('/', '_').replace('@', '_')}-L{self.layer}-{digest}"


def parse_grid(Cs: Sequence[int], ks: Sequence[int], sparsifiers: Sequence[str], d: int, **common: Any) -> list[SAEConfig]:
    """The (C, k, sparsifier) grid as validated SAE configs; one bad cell fails the whole request up front."""
    out = []
    for sp in sparsifiers:
        for C in Cs:
            for k in ks:
                cfg = SAEConfig(d=d, C=int(C), k=int(k), sparsifier=sp, **common)
                cfg.validate()
                out.append(cfg)
    return out


def _steps(spec: SAERunSpec, per_worker_tokens: list[int], batch_tokens: int) -> tuple[int, int]:
    """(steps per epoch, total steps): every worker runs the same number of steps (DDP needs it)."""
    per_worker_batch = max(1, batch_tokens // spec.workers)
    steps_per_epoch = min(per_worker_tokens) // per_worker_batch
    if steps_per_epoch == 0:
        raise NoTokensError(f"too few tokens for one batch: {min(per_worker_tokens)} tokens on the smallest worker, "
                            f"batch {per_worker_batch} per worker; lower --batch-tokens or use fewer workers")
    if spec.token_budget:
        total = max(1, -(-spec.token_budget // batch_tokens))
    else:
        total = max(1, int(round(steps_per_epoch * (spec.epochs or 1.0))))
    return steps_per_epoch, total


def fit_preprocessing(store: Store, flt: TokenSelection, stats: TokenStats, steps: Sequence[str],
                      sample_tokens: int = 65_536, max_images: int = 256) -> Preprocessing:
    """Fit the preprocessing ``steps`` on whole training images, about ``sample_tokens`` tokens of them (at most
    ``max_images``, at least 8): a hash-spread subset, the same on every run, so a re-run fits the same statistics
    and resumes the same run, and the driver's float64 copy stays ~0.5 GB even at d = 1024."""
    steps = parse_steps(steps)
    if not steps:
        return Preprocessing()
    import torch

    per_image = max(1, stats.tokens // max(1, stats.images))
    want = min(max_images, max(8, sample_tokens // per_image))
    sample = load_images(store, flt, 0, max(1, stats.images // want))
    return Preprocessing.fit(torch.as_tensor(sample).float(), steps=steps)


def train_saes(store: str | Store, backbone: str, layer: int = -1, *, Cs: Sequence[int] = (4096,),
               ks: Sequence[int] = (32,), sparsifiers: Sequence[str] = ("topk",), dataset: Sequence[str] | None = None,
               categories: Sequence[str] | None = None, split: str | None = "train", epochs: float | None = 1.0,
               token_budget: int | None = None, lr: float = 1e-3, batch_tokens: int = 4096, workers: int = 1,
               use_gpu: bool = False, cpus_per_worker: float = 1.0, data_mode: str = "auto",
               auxk: bool = True, k_aux: int | None = None, dead_tokens: int | None = None,
               input_scaling: str = "none", preprocess: str | Sequence[str] | None = None,
               checkpoint_every: int = 200, log_every: int = 50, seed: int = 0,
               run_name: str | None = None, storage_path: str | None = None, max_failures: int = 0,
               shuffle_buffer: int = 65536, address: str | None = None, num_cpus: int | None = None,
               batch_images: int | None = None, all_datasets: bool = False, engine: str = "ray-train",
               progress: bool = True, echo: Callable[[str], None] | None = None,
               _fault_at_step: int | None = None) -> TrainSAEResult:
    """Train the (C, k, sparsifier) grid on stored tokens and register every SAE in ``sae_models``.

    ``layer`` -1 means the deepest layer stored for ``backbone``. ``preprocess``: token preprocessing steps
    (``spg_dist.sae.preprocess.STEPS``, e.g. ``"center,standardize,constant"``) fitted here on a spread of the
    training images and recorded with every SAE; ``input_scaling="unit_mean_sq_norm"`` adds the ``scale`` step.
    ``dead_tokens`` None scales the 10 M default down to a tenth of the training tokens on small data.
    ``batch_images`` (the paper's "batch of 16 images") sets ``batch_tokens`` to that many images' tokens.
    Without ``dataset`` the store must hold this backbone/layer for one dataset only (else which data the SAE saw,
    and so whether an evaluation is zero-shot, would be ambiguous), unless ``all_datasets``. ``engine``:
    ``ray-train`` (a ``TorchTrainer``, DDP over ``workers``) or ``local`` (this process, one worker: what sweep
    trials use on their node).

    ``progress``: a line per ``log_every`` steps, and at least every 10 s, from the workers (step, tokens/s, ETA, and
    per SAE loss, NMSE, L0 and dead fraction), printed on the driver with ``echo`` (default stderr) as they come.
    A run registered before with this exact configuration returns at once (``reused``) without starting Ray.
    Interrupted (Ctrl-C), the run keeps its checkpoints (written whole by rank 0 every ``checkpoint_every`` steps)
    and registers nothing: the same command resumes from the newest one.
    """
    t0 = time.perf_counter()
    if engine not in ("ray-train", "local"):
        raise SAEConfigError(f"engine must be ray-train or local, not {engine!r}")
    if engine == "local" and workers != 1:
        raise SAEConfigError("engine local trains in one process: use --workers 1 (or --engine ray-train for DDP)")
    check_run_name(run_name)
    check_storage_path(storage_path)
    store = store if isinstance(store, Store) else Store(store)
    layer = tokens.resolve_layer(store, backbone, layer)
    flt = TokenSelection.of(backbone, layer, dataset=dataset or None, category=categories or None, split=split)
    ids = tokens.require(store, flt, "training tokens", ["image_id", "dataset", "grid_h", "grid_w", "dim"])  # once
    seen = sorted(set(ids.column("dataset").to_pylist()))
    if not dataset and len(seen) > 1 and not all_datasets:
        raise SAEConfigError(f"the store holds {backbone} layer {layer} tokens of {len(seen)} datasets "
                             f"({', '.join(seen)}): pass --aux with the auxiliary one(s) to train on, so "
                             f"evaluation can check zero-shot (or --all-datasets to train on all of them)")
    stats = token_stats(ids, flt)
    if batch_images:
        batch_tokens = int(batch_images) * max(1, stats.tokens // max(1, stats.images))
    per_image = [h * w for h, w in zip(ids.column("grid_h").to_pylist(), ids.column("grid_w").to_pylist())]
    per_worker = [0] * workers
    for image_id, n in zip(ids.column("image_id").to_pylist(), per_image):
        per_worker[owner(image_id, workers)] += n
    if data_mode == "auto":
        data_mode = "memory" if stats.nbytes / workers < _memory_budget(use_gpu) else "stream"
    if data_mode not in ("memory", "stream"):
        raise ValueError(f"data_mode must be auto, memory or stream, not {data_mode!r}")
    if data_mode == "stream":
        per_worker = [stats.tokens // workers] * workers

    total_tokens = stats.tokens * (epochs or 1.0) if not token_budget else token_budget
    if dead_tokens is None:
        dead_tokens = int(min(10_000_000, max(batch_tokens, total_tokens // 10)))
    common = dict(auxk=auxk, k_aux=k_aux, dead_tokens=dead_tokens)
    steps = parse_steps(preprocess) + (("scale",) if input_scaling != "none" else ())
    pre = fit_preprocessing(store, flt, stats, steps)
    configs = parse_grid(Cs, ks, sparsifiers, pre.out_dim(stats.dim),
                         **{k: v for k, v in common.items() if v is not None})
    train_cfg = TrainConfig(lr=lr, batch_tokens=batch_tokens, seed=seed)
    spec = SAERunSpec(store.uri, backbone, layer, [c.to_dict() for c in configs], train_cfg.to_dict(), pre.to_dict(),
                      {**flt.to_dict(), "datasets_seen": seen}, epochs, token_budget, workers, use_gpu,
                      cpus_per_worker, data_mode, checkpoint_every, log_every)
    name = run_name or spec.run_name()
    storage = storage_path or _default_storage(store)
    run_dir = os.path.join(storage, name)
    os.makedirs(run_dir, exist_ok=True)
    nonfinite = os.path.join(run_dir, NONFINITE_FILE)
    if os.path.exists(nonfinite):
        os.remove(nonfinite)
    steps_per_epoch, total = _steps(spec, per_worker, batch_tokens)
    done = _registered(store, name, configs, total)
    if done is not None:  # this exact run finished and was registered: nothing to do
        return TrainSAEResult(name, run_dir, done, reused=True, seconds=time.perf_counter() - t0)
    _check_resumable(run_dir, configs, train_cfg, pre)

    loop_config = dict(asdict(spec), run_name=name, run_dir=run_dir, steps_per_epoch=steps_per_epoch,
                       total_steps=total, shuffle_buffer=shuffle_buffer, fault_at_step=_fault_at_step,
                       storage_options=store.storage_options, progress=progress)
    if engine == "local":
        if data_mode == "stream":
            raise SAEConfigError("engine local holds the tokens in memory; data_mode stream needs engine ray-train")
        final = train_local(loop_config)
        if os.path.exists(nonfinite):
            info = json.loads(open(nonfinite).read())
            kept = newest_good_checkpoint(run_dir, echo=lambda _: None) or "none (no step finished before it)"
            raise NonFiniteLossError(f"{info['message']}; run stopped, last good checkpoint kept: {kept}")
        models = register(store, final, spec, name, run_dir, total)
        return TrainSAEResult(name, run_dir, models, seconds=time.perf_counter() - t0)

    from ray.train.torch import TorchTrainer

    from spg_dist.ray.progress import relay
    from spg_dist.ray.runtime import ensure_ray

    if progress:
        (echo or _stderr)(f"[train-sae] {name}: {total} steps of {batch_tokens:,} tokens, {len(configs)} SAE(s), "
                          f"{workers} worker(s), {data_mode} data; starting Ray Train")
    ensure_ray(address, num_cpus)
    datasets = {"train": stream_dataset(store, flt, pre)} if data_mode == "stream" else None
    with relay(echo, enabled=progress) as channel:
        result = _fit(TorchTrainer, dict(loop_config, progress_channel=channel), datasets, name, storage, workers,
                      use_gpu, cpus_per_worker, max_failures)
    if os.path.exists(nonfinite):
        info = json.loads(open(nonfinite).read())
        latest = result.checkpoint.path if result.checkpoint else "none (no step finished before it)"
        raise NonFiniteLossError(f"{info['message']}; run stopped, last good checkpoint kept: {latest}")
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} produced no checkpoint")
    models = register(store, result.checkpoint, spec, name, run_dir, total)
    return TrainSAEResult(name, run_dir, models, seconds=time.perf_counter() - t0)


def _fit(TorchTrainer, loop_config: dict, datasets, name: str, storage: str, workers: int, use_gpu: bool,
         cpus_per_worker: float, max_failures: int):
    import ray.train
    import ray.train.torch

    trainer = TorchTrainer(
        train_loop, train_loop_config=loop_config, datasets=datasets,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               resources_per_worker=None if use_gpu else {"CPU": cpus_per_worker}),
        run_config=ray.train.RunConfig(name=name, storage_path=storage,
                                       failure_config=ray.train.FailureConfig(max_failures=max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if use_gpu else "gloo"))
    return trainer.fit()


def _stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def check_run_name(run_name: str | None) -> None:
    """A run name is one path component inside the runs folder: never ``..``, a slash or an absolute path."""
    if run_name is not None and (not RUN_NAME.fullmatch(run_name) or ".." in run_name):
        raise SAEConfigError(f"--run-name {run_name!r}: use letters, digits, '.', '_' and '-' only (it names a "
                             f"folder inside the store's _runs)")


def register(store: Store, checkpoint, spec: SAERunSpec, run: str, run_dir: str, total_steps: int) -> list[dict]:
    """Write one ``sae_models`` row per SAE of the final checkpoint (weights as safetensors bytes)."""
    import datetime as dt

    import torch

    from spg_dist.sae.metrics import firing_frequency_histogram_png

    trainer = MultiSAETrainer([SAEConfig.from_dict(c) for c in spec.configs], TrainConfig.from_dict(spec.train),
                              Preprocessing.from_dict(spec.preprocessing), device=torch.device("cpu"))
    with (checkpoint.as_directory() if hasattr(checkpoint, "as_directory") else contextlib.nullcontext(checkpoint)) as d:
        load_checkpoint(d, trainer)
        position = json.loads(open(os.path.join(d, POSITION_FILE)).read())
    if position["step"] != total_steps:
        raise RuntimeError(f"run {run} stopped at step {position['step']} of {total_steps}")
    history = position.get("history", [])
    rows = []
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    for i, (cfg, sae) in enumerate(zip(trainer.configs, trainer.saes)):
        final = history[-1]["saes"][i] if history else {}
        tracker = trainer.trackers[i]
        tokens_seen = int(position["step"] * trainer.train.batch_tokens)
        rows.append(dict(
            sae_id=f"{spec.backbone}/L{spec.layer}/{cfg.name}/{run}", backbone=spec.backbone, layer=spec.layer,
            d=cfg.d, C=cfg.C, k=cfg.k, sparsifier=cfg.sparsifier, run=run,
            config=json.dumps({"sae": cfg.to_dict(), "preprocessing": sae.preprocessing.to_dict(),
                               "train": spec.train, "filter": spec.filter, "data_mode": spec.data_mode,
                               "workers": spec.workers, "epochs": spec.epochs, "token_budget": spec.token_budget,
                               "resumed_from_step": position.get("resumed_from", 0)}),
            metrics=json.dumps({"final": final, "curve": [{"step": h["step"], **h["saes"][i]} for h in history],
                                "worker_peak_rss_mb": max((h.get("peak_rss_mb", 0.0) for h in history), default=0.0),
                                "latents": tracker.record()}),
            nmse=float(final.get("nmse", float("nan"))), explained_variance=float(final.get("explained_variance", float("nan"))),
            l0=float(final.get("l0", float("nan"))), dead_fraction=tracker.dead_fraction(),
            steps=int(position["step"]), tokens_seen=tokens_seen, weights=sae.to_bytes(),
            firing_histogram_png=firing_frequency_histogram_png(
                tracker.fire_counts, tracker.tokens_observed, dead=tracker.dead_mask(), dead_tokens=tracker.dead_tokens,
                title=f"SAE C={cfg.C} k={cfg.k}"),
            run_dir=run_dir, created_at=now))
    sae_models.upsert(store, rows)
    return [{k: v for k, v in r.items() if k not in ("weights", "firing_histogram_png")} for r in rows]


def _check_resumable(run_dir: str, configs: list[SAEConfig], train_cfg: TrainConfig, pre: Preprocessing) -> None:
    """A run directory holding checkpoints of other SAEs (e.g. a reused --run-name) fails here, in one line,
    instead of inside every worker after the cluster has started. Only checkpoint folders count (Ray Train also
    writes ``checkpoint_manager_snapshot.json`` there)."""
    from spg_dist.sae import read_meta

    folders = sorted(f for f in glob.glob(os.path.join(run_dir, "checkpoint_*"))
                     if os.path.isfile(os.path.join(f, "trainer.json")))
    if not folders:
        return
    try:
        meta = read_meta(folders[-1])
    except (OSError, ValueError):
        return  # a damaged checkpoint: resuming falls back to the newest whole one
    probe = MultiSAETrainer(configs, train_cfg, pre)
    try:
        probe.check_compatible(meta)
    except SAEConfigError as e:
        raise SAEConfigError(f"run {os.path.basename(run_dir)} has checkpoints of another configuration ({e}); "
                             f"use another --run-name or remove {run_dir}") from None


def _registered(store: Store, run: str, configs: list[SAEConfig], total: int) -> list[dict] | None:
    rows = sae_models.of_run(store, run)
    want = {(c.C, c.k, c.sparsifier) for c in configs}
    have = {(r["C"], r["k"], r["sparsifier"]) for r in rows if r["steps"] == total}
    return [r for r in rows if (r["C"], r["k"], r["sparsifier"]) in want] if have >= want else None


def _memory_budget(use_gpu: bool) -> float:
    """Bytes of fp16 tokens one worker may hold: a third of the GPU, or an eighth of this machine's RAM."""
    import torch

    if use_gpu and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 3
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 8


def _default_storage(store: Store) -> str:
    """``<store>/_runs`` for a local store; for an object store, checkpoints stay on local disk
    (``$SPG_RUNS_DIR``, else ``~/.cache/spg/runs/<store>``): the run folder is handled with file calls."""
    if "://" not in store.uri or store.uri.startswith("file://"):
        return f"{store.uri.rstrip('/')}/_runs"
    root = os.environ.get("SPG_RUNS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "spg", "runs")
    return os.path.join(root, re.sub(r"[^A-Za-z0-9._-]+", "_", store.uri))


def check_storage_path(storage_path: str | None) -> None:
    if storage_path and "://" in storage_path and not storage_path.startswith("file://"):
        raise SAEConfigError(f"--storage-path must be a folder (local, or a mount every node shares for multi-worker "
                             f"ray-train), got {storage_path!r}; the store itself may be s3://")


__all__ = ["SAERunSpec", "TrainSAEResult", "check_run_name", "train_saes"]
