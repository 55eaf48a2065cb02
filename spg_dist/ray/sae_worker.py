"""The Ray Train worker of ``spg train-sae`` (``train_loop``): what runs on every worker of a ``TorchTrainer``.

Reads the worker's shard (preprocessed per image, held in device memory) or its streaming split, initialises or
resumes the trainer from the latest checkpoint (weights, optimizer, trackers, data position), steps every SAE of
the grid on the same batches, checkpoints every ``checkpoint_every`` steps from rank 0, and on a non-finite loss
leaves a marker the driver turns into one error line while the last good checkpoint stays. The driver side (run
spec, resume checks, registration) is :mod:`spg_dist.ray.train_sae`.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time

from spg_dist.ray.sae_data import load_shard, memory_batches
from spg_dist.sae import MultiSAETrainer, NonFiniteLossError, Preprocessing, SAEConfig, TrainConfig
from spg_dist.sae.checkpoint import load_checkpoint, save_checkpoint
from spg_dist.store import Store
from spg_dist.store.tokens import TokenSelection

POSITION_FILE = "position.json"
NONFINITE_FILE = "nonfinite.json"


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    store = Store(config["store"])
    flt = TokenSelection.from_dict(config["filter"])
    train_cfg = TrainConfig.from_dict(config["train"])
    configs = [SAEConfig.from_dict(c) for c in config["configs"]]
    pre = Preprocessing.from_dict(config["preprocessing"])
    trainer = MultiSAETrainer(configs, train_cfg, pre, device=device)
    per_worker_batch = max(1, train_cfg.batch_tokens // world)
    steps_per_epoch, total = config["steps_per_epoch"], config["total_steps"]

    if config["data_mode"] == "memory":
        tokens = load_shard(store, flt, rank, world, preprocessing=pre).to(device)  # per image, once
    else:
        tokens = None
        shard = ray.train.get_dataset_shard("train")

    position = {"epoch": 0, "batch": 0, "step": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            load_checkpoint(d, trainer)
            position = json.loads(open(os.path.join(d, POSITION_FILE)).read())
        position["resumed_from"] = position["step"]
        if rank == 0:
            print(f"[spg] resumed {config['run_name']} from step {position['step']}", flush=True)
    else:
        pick = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(train_cfg.seed))[:65536] \
            if tokens is not None else None  # a spread of images, not the first few
        sample = tokens[pick] if tokens is not None else next(iter(shard.iter_torch_batches(
            batch_size=min(65536, per_worker_batch * 4), dtypes=torch.float32)))["x"]
        trainer.init_from_sample(sample.to(device).float(), preprocessed=True)

    wrap = (lambda m: ray.train.torch.prepare_model(m, move_to_device=False)) if world > 1 else None
    trainer.wrap(wrap)
    fired_reduce = None
    if world > 1:
        def fired_reduce(mask):
            m = mask.to(torch.int32)
            dist.all_reduce(m, op=dist.ReduceOp.MAX)
            return m.bool()

    history: list[dict] = position.get("history", [])
    step, t0, resumed_from = position["step"], time.perf_counter(), position.get("resumed_from", 0)

    def checkpoint(metrics: dict, final: bool = False) -> None:
        pos = {"epoch": epoch, "batch": batch_idx, "step": step, "history": history, "final": final,
               "resumed_from": resumed_from}
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(trainer, d)
                with open(os.path.join(d, POSITION_FILE), "w") as f:
                    json.dump(pos, f)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)

    epoch, batch_idx = position["epoch"], position["batch"]
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
                if step % config["log_every"] == 0 or step == total:
                    summary = {"step": step, "tokens": step * train_cfg.batch_tokens,
                               "tokens_per_s": step * train_cfg.batch_tokens / max(time.perf_counter() - t0, 1e-9),
                               "saes": last}
                    history.append(summary)
                    if rank == 0:
                        print("[spg] step {}/{} ".format(step, total) + " | ".join(
                            f"{c.name}: nmse {m['nmse']:.3f} L0 {m['l0']:.1f} dead {100 * m['dead_fraction']:.1f}%"
                            for c, m in zip(configs, last)), flush=True)
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


def _inject_fault_once(run_dir: str) -> None:
    """Fault injection for tests: SIGKILL this worker, as a lost node would, once per run."""
    marker = os.path.join(run_dir, ".fault_injected")
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
