"""The worker side of ``spg train-sae``: one training loop, run either by every worker of a Ray Train
``TorchTrainer`` (:func:`train_loop`) or in one process (:func:`train_local`, what sweep trials use: one process on
whichever node the trial landed, on its share of a GPU).

The loop reads the worker's shard (preprocessed per image, held in device memory) or its streaming split,
initialises or resumes the trainer from the newest good checkpoint (weights, optimizer, trackers, data position),
steps every SAE of the grid on the same batches, checkpoints every ``checkpoint_every`` steps from rank 0, and on a
non-finite loss leaves a marker the driver turns into one error line while the last good checkpoint stays. The
driver side (run spec, resume checks, registration) is :mod:`spg_dist.ray.train_sae`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from typing import Any, Callable, Iterator

from spg_dist.ray.progress import emit
from spg_dist.ray.sae_data import load_shard, memory_batches
from spg_dist.sae import MultiSAETrainer, NonFiniteLossError, Preprocessing, SAEConfig, TrainConfig
from spg_dist.sae.checkpoint import load_checkpoint, read_meta, save_checkpoint
from spg_dist.store import Store
from spg_dist.store.tokens import TokenSelection

POSITION_FILE = "position.json"
NONFINITE_FILE = "nonfinite.json"
CHECKPOINT_PREFIX = "checkpoint_"
LOG_PREFIX = "[spg]"
PROGRESS_PERIOD_S = 10.0  # a progress line at least this often, whatever --log-every


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def progress_line(run: str, step: int, total: int, tokens_per_s: float, eta_s: float | None, configs: list,
                  metrics: list[dict]) -> str:
    """One line of training progress: step, tokens/s, ETA, and per SAE its loss, NMSE, L0 and dead fraction (the
    tracker's, as stored with the model)."""
    eta = _duration(eta_s) if eta_s is not None else "?"
    return (f"[train-sae] {run} step {step}/{total} ({100 * step / max(total, 1):.0f}%) {tokens_per_s:,.0f} tokens/s "
            f"ETA {eta} | " + " | ".join(
                f"{c.name}: loss {m['loss']:.4g} nmse {m['nmse']:.3f} L0 {m['l0']:.1f} dead "
                f"{100 * m['dead_fraction']:.1f}%" for c, m in zip(configs, metrics)))


class WorkerContext:
    """What the loop needs from whoever runs it: rank, world, device, the latest checkpoint, and a way to report
    metrics with (rank 0) a checkpoint folder."""

    rank: int = 0
    world: int = 1

    def device(self, use_gpu: bool):
        import torch

        return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        return contextlib.nullcontext(None)

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        raise NotImplementedError

    def stream(self):
        raise NotImplementedError("--data-mode stream needs --engine ray-train")

    def wrap(self) -> Callable | None:
        return None

    def fired_reduce(self) -> Callable | None:
        return None


def checkpoint_ok(directory: str) -> str | None:
    """Why a checkpoint folder cannot be resumed from (missing or unreadable files), or None when it is whole."""
    try:
        meta = read_meta(directory)
        for name in [*meta["files"]["saes"], meta["files"]["state"]]:
            why = _safetensors_whole(os.path.join(directory, name))
            if why:
                return f"{name} {why}"
        json.loads(open(os.path.join(directory, POSITION_FILE)).read())
    except (OSError, ValueError, KeyError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _safetensors_whole(path: str) -> str | None:
    """Why a safetensors file is not whole (shorter than its header says, or an unreadable header), else None; reads
    only the header."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "is truncated"
        n = int.from_bytes(head, "little")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "has an unreadable header"
        f.seek(0, os.SEEK_END)
        size = f.tell()
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if size < 8 + n + max(ends, default=0):
        return "is truncated"
    return None


def newest_good_checkpoint(run_dir: str, echo: Callable[[str], None] = print) -> str | None:
    """The newest whole ``checkpoint_*`` folder of a run (by step), skipping damaged ones with one line each."""
    if not os.path.isdir(run_dir):
        return None
    found = []
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if name.startswith(CHECKPOINT_PREFIX) and os.path.isdir(path):
            try:
                step = json.loads(open(os.path.join(path, POSITION_FILE)).read())["step"]
            except (OSError, ValueError, KeyError):
                step = -1
            found.append((step, name, path))
    for step, name, path in sorted(found, reverse=True):
        why = checkpoint_ok(path)
        if why is None:
            return path
        echo(f"{LOG_PREFIX} skipping damaged checkpoint {name} of {os.path.basename(run_dir)}: {why}")
    return None


class LocalContext(WorkerContext):
    """One process: checkpoints are folders ``<run_dir>/checkpoint_<step>`` written whole (temp folder, then
    rename), the two newest kept; resume picks the newest whole one."""

    def __init__(self, run_dir: str, keep: int = 2):
        self.run_dir, self.keep = run_dir, keep
        self.last_checkpoint: str | None = None

    def latest_checkpoint(self):
        return contextlib.nullcontext(newest_good_checkpoint(self.run_dir))

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        if checkpoint_dir is None:
            return
        step = json.loads(open(os.path.join(checkpoint_dir, POSITION_FILE)).read())["step"]
        final = os.path.join(self.run_dir, f"{CHECKPOINT_PREFIX}{step:09d}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint_dir, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self.last_checkpoint = final
        kept = sorted(n for n in os.listdir(self.run_dir) if n.startswith(CHECKPOINT_PREFIX)
                      and not n.endswith(".tmp"))
        for old in kept[:-self.keep]:
            shutil.rmtree(os.path.join(self.run_dir, old), ignore_errors=True)


class RayTrainContext(WorkerContext):
    """A worker of a Ray Train ``TorchTrainer``: Ray Train keeps the checkpoints and restarts failed workers."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def device(self, use_gpu: bool):
        import ray.train.torch
        import torch

        return ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            why = checkpoint_ok(d)
            if why is None:
                yield d
                return
            # Ray Train hands out its latest checkpoint even when a file in it is damaged: fall back to the
            # newest whole one among the run's other checkpoints
            run_dir = os.path.dirname(os.path.normpath(ckpt.path))
            print(f"{LOG_PREFIX} skipping damaged checkpoint {os.path.basename(ckpt.path)}: {why}", flush=True)
            yield newest_good_checkpoint(run_dir, echo=lambda m: print(m, flush=True))

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    def stream(self):
        import ray.train

        return ray.train.get_dataset_shard("train")

    def wrap(self):
        import ray.train.torch

        return (lambda m: ray.train.torch.prepare_model(m, move_to_device=False)) if self.world > 1 else None

    def fired_reduce(self):
        if self.world == 1:
            return None
        import torch
        import torch.distributed as dist

        def reduce(mask):
            m = mask.to(torch.int32)
            dist.all_reduce(m, op=dist.ReduceOp.MAX)
            return m.bool()
        return reduce


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    run_worker(config, RayTrainContext())


def train_local(config: dict) -> str | None:
    """The same loop in this process (world 1); returns the final checkpoint folder (None after a non-finite loss)."""
    ctx = LocalContext(config["run_dir"])
    os.makedirs(config["run_dir"], exist_ok=True)
    run_worker(config, ctx)
    return ctx.last_checkpoint


def run_worker(config: dict, ctx: WorkerContext) -> None:
    import torch

    rank, world = ctx.rank, ctx.world
    channel = config.get("progress_channel")
    show = config.get("progress", True) and rank == 0

    def say(line: str) -> None:
        if show:
            emit(channel, line)

    device = ctx.device(config["use_gpu"])
    store = Store(config["store"], storage_options=config.get("storage_options"))
    flt = TokenSelection.from_dict(config["filter"])
    train_cfg = TrainConfig.from_dict(config["train"])
    configs = [SAEConfig.from_dict(c) for c in config["configs"]]
    pre = Preprocessing.from_dict(config["preprocessing"])
    trainer = MultiSAETrainer(configs, train_cfg, pre, device=device)
    per_worker_batch = max(1, train_cfg.batch_tokens // world)
    steps_per_epoch, total = config["steps_per_epoch"], config["total_steps"]

    if config["data_mode"] == "memory":
        tokens = load_shard(store, flt, rank, world, preprocessing=pre).to(device)  # per image, once
        shard = None
    else:
        tokens, shard = None, ctx.stream()

    position: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0}
    with ctx.latest_checkpoint() as d:
        if d is not None:
            load_checkpoint(d, trainer)
            position = json.loads(open(os.path.join(d, POSITION_FILE)).read())
    if position["step"]:
        position["resumed_from"] = position["step"]
        say(f"{LOG_PREFIX} resumed {config['run_name']} from step {position['step']}")
    else:
        pick = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(train_cfg.seed))[:65536] \
            if tokens is not None else None  # a spread of images, not the first few
        sample = tokens[pick] if tokens is not None else next(iter(shard.iter_torch_batches(
            batch_size=min(65536, per_worker_batch * 4), dtypes=torch.float32)))["x"]
        trainer.init_from_sample(sample.to(device).float(), preprocessed=True)

    held = f"{tokens.shape[0]:,} tokens in {'GPU' if device.type == 'cuda' else 'CPU'} memory" if tokens is not None \
        else "streamed tokens"
    say(f"[train-sae] {config['run_name']}: rank 0 of {world} ready ({held}), training from step {position['step']}")
    trainer.wrap(ctx.wrap())
    fired_reduce = ctx.fired_reduce()
    history: list[dict] = position.get("history", [])
    step, t0, resumed_from = position["step"], time.perf_counter(), position.get("resumed_from", 0)
    last_said = t0
    epoch, batch_idx = position["epoch"], position["batch"]

    def checkpoint(metrics: dict, final: bool = False) -> None:
        pos = {"epoch": epoch, "batch": batch_idx, "step": step, "history": history, "final": final,
               "resumed_from": resumed_from}
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(trainer, d)
                with open(os.path.join(d, POSITION_FILE), "w") as f:
                    json.dump(pos, f)
                ctx.report(metrics, d)
        else:
            ctx.report(metrics, None)

    last: list[dict] = []
    try:
        while step < total:
            if tokens is not None:
                batches = memory_batches(tokens, per_worker_batch, epoch, train_cfg.seed + rank, start=batch_idx)
            else:
                it = shard.iter_torch_batches(batch_size=per_worker_batch, dtypes=torch.float16, drop_last=True,
                                              local_shuffle_buffer_size=config["shuffle_buffer"],
                                              local_shuffle_seed=train_cfg.seed + rank + epoch)
                batches = (b["x"] for i, b in enumerate(it) if i >= batch_idx)
            for x in batches:
                if batch_idx >= steps_per_epoch or step >= total:
                    break
                last = trainer.step(x.to(device, non_blocking=True).float(), fired_reduce=fired_reduce,
                                    world_size=world, preprocessed=True)
                step, batch_idx = step + 1, batch_idx + 1
                if step == config.get("fault_at_step") and rank == 0:
                    _inject_fault_once(config["run_dir"])
                logged = step % config["log_every"] == 0 or step == total
                now = time.perf_counter()
                if logged or now - last_said >= PROGRESS_PERIOD_S:
                    elapsed = max(now - t0, 1e-9)
                    rate = (step - resumed_from) / elapsed  # steps/s of this attempt
                    tokens_per_s = rate * train_cfg.batch_tokens
                    if logged:  # the curve stored with the model: at --log-every steps only, the same on every run
                        history.append({"step": step, "tokens": step * train_cfg.batch_tokens,
                                        "tokens_per_s": tokens_per_s, "saes": last, "peak_rss_mb": peak_rss_mb()})
                    say(progress_line(config["run_name"], step, total, tokens_per_s,
                                      (total - step) / rate if rate > 0 else None, configs, last))
                    last_said = now
                if step % config["checkpoint_every"] == 0 and step < total:
                    checkpoint({"step": step})
            else:
                epoch, batch_idx = epoch + 1, 0
                continue
            if batch_idx >= steps_per_epoch:
                epoch, batch_idx = epoch + 1, 0
    except NonFiniteLossError as e:
        if rank == 0:
            with open(os.path.join(config["run_dir"], NONFINITE_FILE), "w") as f:
                json.dump({"message": str(e), "step": step}, f)
        return
    checkpoint({"step": step, "done": True}, final=True)


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB): recorded in the training log so a streamed run can show that a
    worker's memory stays bounded whatever the size of the token set."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _inject_fault_once(run_dir: str) -> None:
    """Fault injection for tests: SIGKILL this worker, as a lost node would, once per run."""
    marker = os.path.join(run_dir, ".fault_injected")
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
