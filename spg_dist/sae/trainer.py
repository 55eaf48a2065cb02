"""Single-process training step of several SAEs on the same token batches (one pass feeds a (C, k) grid).

Why several at once: Stage 1 is bound by how fast tokens arrive (the token stream from the store to the SAE
trainer), so every batch that reaches a worker trains every SAE of the sweep. Each SAE keeps its own Adam
optimizer, dead-latent tracker, step and token counters; they only share the batch and the preprocessing.

Distribution is not this module's business (it never imports Ray or torch.distributed), but it is written for
it: the forward runs through ``wrap(module)`` (e.g. DDP or ``ray.train.torch.prepare_model``) so gradients are
all-reduced by the wrapper; ``fired_reduce`` lets trackers agree across workers; ``world_size`` makes token
counters global; the state is tensors + JSON (no pickle) for checkpoints (checkpoint.py).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from spg_dist.errors import SpgError
from spg_dist.sae.config import SAEConfig, SAEConfigError, TrainConfig, config_diff
from spg_dist.sae.metrics import explained_variance, l0
from spg_dist.sae.model import TopKSAE
from spg_dist.sae.multi import MultiSAE
from spg_dist.sae.preprocess import Preprocessing
from spg_dist.sae.tracker import DeadLatentTracker

TRAINER_FORMAT = "spg_dist.sae.trainer/1"
_STATS = ("loss", "nmse", "explained_variance", "l0", "aux_loss", "total_loss", "dead_fraction")


class NonFiniteLossError(SpgError, RuntimeError):
    """A step produced a NaN/inf loss (or gradient). Raised before any optimizer step: weights, optimizer
    state, trackers and counters are exactly as before the failed step, so the caller may skip the batch,
    lower the learning rate, or restore a checkpoint."""


class MultiSAETrainer:
    """Trains ``len(configs)`` SAEs on the same batches; see the module docstring.

    Args:
        configs: one SAEConfig per SAE (same ``d``). SAEs with the same ``C`` start from the same atoms
            (seeded by ``train.seed``), so a sweep over k compares like with like.
        train: optimizer and bookkeeping settings (defaults if None).
        preprocessing: explicit token preprocessing (never refitted); if None it is fitted by
            :meth:`init_from_sample` with ``train.scale_mode``.
        device: where parameters, optimizer state and trackers live.
        wrap: optional ``nn.Module -> nn.Module`` (DDP, ``ray.train.torch.prepare_model``). Applied once, lazily
            at the first :meth:`step`, i.e. after :meth:`init_from_sample`/checkpoint loading, so that DDP's
            initial broadcast carries rank 0's initialisation to every worker. It must keep the Parameter
            objects (DDP and ``.to(device)`` do), since the optimizers hold them.

    Usage: ``init_from_sample(tokens)`` once, then ``step(batch)`` per batch. Counters: ``steps[i]``,
    ``tokens[i]`` (global tokens, all workers).
    """

    def __init__(self, configs: Sequence[SAEConfig], train: TrainConfig | None = None,
                 preprocessing: Preprocessing | None = None, device: str | torch.device = "cpu",
                 wrap: Callable[[nn.Module], nn.Module] | None = None) -> None:
        if not configs:
            raise SAEConfigError("MultiSAETrainer: no SAE configs")
        for cfg in configs:
            cfg.validate()
        dims = sorted({cfg.d for cfg in configs})
        if len(dims) > 1:
            raise SAEConfigError(f"MultiSAETrainer: SAEs trained on one token stream must share d, got d={dims}")
        self.configs: list[SAEConfig] = list(configs)
        self.train_config = train if train is not None else TrainConfig()
        self.device = torch.device(device)
        self.fit_preprocessing = preprocessing is None
        self.preprocessing = preprocessing if preprocessing is not None else Preprocessing()
        self.generator = torch.Generator().manual_seed(self.train_config.seed)  # for callers' shuffles; checkpointed
        saes = [TopKSAE(cfg, self.preprocessing, seed=self.train_config.seed, device=self.device)
                for cfg in self.configs]
        self.module = MultiSAE(saes).train()
        tc = self.train_config
        self.optimizers = [torch.optim.Adam(sae.parameters(), lr=tc.lr, betas=tc.betas, eps=tc.eps) for sae in saes]
        self.trackers = [DeadLatentTracker(cfg.C, self.dead_tokens(i), device=self.device)
                         for i, cfg in enumerate(self.configs)]
        self.steps = [0] * len(saes)
        self.tokens = [0] * len(saes)
        self.initialized = False
        self._wrap = wrap
        self._wrapped: nn.Module | None = None
        self._window: list[dict[str, float]] = [{} for _ in saes]
        self._window_steps = [0] * len(saes)
        self._buffers_before: list[list[Tensor]] = []
        self._trackers_before: list[tuple] = []

    # --------------------------------------------------------------------------------------------- accessors
    @property
    def saes(self) -> list[TopKSAE]:
        return list(self.module.saes)

    @property
    def train(self) -> TrainConfig:
        """The TrainConfig (alias of ``train_config``)."""
        return self.train_config

    def dead_tokens(self, i: int) -> int:
        """Dead threshold of SAE ``i``: the TrainConfig override, else the SAE's own."""
        return self.train_config.dead_tokens or self.configs[i].dead_tokens

    def wrap(self, fn: Callable[[nn.Module], nn.Module] | None) -> None:
        """Set (or with None, clear) the wrapper after construction, e.g. once a checkpoint is loaded. Same lazy
        semantics as the constructor's ``wrap``: applied at the next :meth:`step`."""
        self._wrap = fn
        self._wrapped = None

    @property
    def wrapped_module(self) -> nn.Module:
        """The module the forward runs through (``wrap(module)`` once wrapped, else ``module``)."""
        if self._wrap is not None and self._wrapped is None:
            self._wrapped = self._wrap(self.module)
        return self._wrapped if self._wrapped is not None else self.module

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.train_config.autocast_bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---------------------------------------------------------------------------------------------- training
    @torch.no_grad()
    def init_from_sample(self, x: Tensor, max_tokens: int = 65_536, preprocessed: bool = False) -> None:
        """Initialise from RAW tokens ``[N, d]`` (the first ``max_tokens`` rows; pass a shuffled sample):
        fit the preprocessing if none was given, then set every SAE's ``b_pre`` per its ``init_b_pre`` and
        its encoder scale (``TopKSAE.init_encoder_scale``). ``preprocessed``: ``x`` already went through the
        trainer's (explicit) preprocessing, as :meth:`step`'s ``preprocessed``.

        Every worker must pass the same sample (or the trainer an explicit Preprocessing): the scale is a
        Python float, not a tensor DDP would broadcast.
        """
        if preprocessed:
            if self.fit_preprocessing:
                raise ValueError("init_from_sample(preprocessed=True) needs an explicit Preprocessing")
            x = x.reshape(-1, self.configs[0].d)[:max_tokens].to(self.device)
        else:
            for sae in self.saes:
                sae._check_tokens(x)
            if not self.preprocessing.needs_images:  # loose tokens: keep the first max_tokens rows
                x = x.reshape(-1, x.shape[-1])[:max_tokens]
            x = x.to(self.device)
            if self.fit_preprocessing:
                self.preprocessing = Preprocessing.fit(x, self.train_config.scale_mode)
                for sae in self.saes:
                    sae.preprocessing = self.preprocessing
            if any(sae.preprocessing != self.preprocessing for sae in self.saes):
                raise ValueError("init_from_sample: the SAEs of one trainer must share its preprocessing")
            x = self.saes[0].preprocess(x)[:max_tokens]
        centres: dict[str, Tensor] = {}
        for sae in self.saes:
            key = sae.config.init_b_pre
            if key not in centres:
                sae.init_b_pre(x, preprocessed=True)
                centres[key] = sae.b_pre.detach().clone()
            else:
                sae.b_pre.copy_(centres[key])
            sae.init_encoder_scale(x[:8192], preprocessed=True)
        self.initialized = True

    def _check_ready(self) -> None:
        if self.initialized:
            return
        needs = [c.name for c in self.configs if c.init_b_pre != "zeros"]
        if self.fit_preprocessing or needs:
            what = "fit the input scale" if self.fit_preprocessing else f"initialise b_pre of {needs}"
            raise RuntimeError(f"MultiSAETrainer: call init_from_sample(tokens) before step() (to {what})")
        self.initialized = True

    def step(self, x: Tensor, fired_reduce: Callable[[Tensor], Tensor] | None = None,
             world_size: int = 1, preprocessed: bool = False) -> list[dict[str, Any]]:
        """One optimisation step of every SAE on RAW tokens ``x [N, d]`` (or, with ``preprocessed``, tokens
        the loader already sent through the trainer's preprocessing); returns one metrics dict per SAE.

        Order: forward (through the wrapped module; AuxK uses the dead mask from before the step), tracker
        update, finiteness check, backward, remove parallel decoder grads, Adam step, renormalise atoms.
        ``world_size``: workers taking this step with equally sized batches (token counters and the dead-latent
        clock count ``N * world_size``).

        ``dead_fraction`` in the returned metrics is the tracker's after this step (latents that have not fired
        in the last ``dead_tokens`` tokens, :mod:`spg_dist.sae.tracker`): the last step's value equals
        ``trackers[i].dead_fraction()`` and what is stored with the model, so a log and the stored number agree.

        Non-finite loss: raises :class:`NonFiniteLossError` naming the SAE and step, before any weight changes.
        Single process: checked before backward. Wrapped (DDP) or ``world_size > 1``: backward runs first (a
        rank that skipped it would leave the others hanging in the gradient all-reduce), then losses AND
        gradients are checked (a NaN on one rank reaches every rank through the all-reduce), so all ranks
        raise together.
        """
        self._check_ready()
        module = self.wrapped_module
        distributed = self._wrap is not None or world_size > 1
        x = x.to(self.device, non_blocking=True)
        n_global = int(x.reshape(-1, x.shape[-1]).shape[0]) * int(world_size)
        masks = [tr.dead_mask(self.dead_tokens(i)) for i, tr in enumerate(self.trackers)]
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        # buffers the forward updates (BatchTopK threshold EMA): restored if the step is rejected
        self._buffers_before = [[b.detach().clone() for b in sae.buffers()] for sae in self.saes]
        with self._autocast():
            total, outs = module(x, [m if cfg.auxk else None for m, cfg in zip(masks, self.configs)], preprocessed)
        with torch.no_grad():
            rows = [torch.stack([o.loss.float(), o.fvu.float(), explained_variance(o.x, o.x_hat),
                                 l0(o.values), o.aux_loss.float(), o.total.float()]) for o in outs]
            stats = torch.stack(rows)
        if not distributed:
            stats = self._update_trackers(outs, stats, n_global, fired_reduce)
            values = stats.tolist()  # the step's one host sync
            self._raise_if_nonfinite(values, None)
            total.backward()
        else:
            total.backward()  # (every rank runs the same collectives in the same order: backward, fired_reduce)
            grads_ok = torch.stack([torch.stack([torch.isfinite(p.grad).all() for p in sae.parameters()
                                                 if p.grad is not None]).all() for sae in self.saes])
            stats = self._update_trackers(outs, stats, n_global, fired_reduce)
            values = stats.tolist()
            self._raise_if_nonfinite(values, grads_ok.tolist())
        for sae, opt in zip(self.saes, self.optimizers):
            sae.remove_parallel_grads()
            opt.step()
            sae.normalize_decoder()
        metrics = []
        for i in range(len(self.trackers)):
            self.steps[i] += 1
            self.tokens[i] += n_global
            row = dict(zip(_STATS, values[i]))
            self._accumulate(i, row)
            metrics.append({"sae": self.configs[i].name, "index": i, "step": self.steps[i],
                            "tokens": self.tokens[i], **row, "lr": self.optimizers[i].param_groups[0]["lr"]})
        return metrics

    @torch.no_grad()
    def _update_trackers(self, outs: Sequence[Any], stats: Tensor, n_global: int,
                         fired_reduce: Callable[[Tensor], Tensor] | None) -> Tensor:
        """Account the step in every tracker (kept undoable until the step is accepted) and append each SAE's
        dead fraction after it to ``stats`` (no host sync)."""
        self._trackers_before = [tr.snapshot() for tr in self.trackers]
        for out, tracker in zip(outs, self.trackers):
            tracker.update(out.indices.detach(), out.values.detach(), n_global, fired_reduce)
        dead = torch.stack([tr.dead_mask(self.dead_tokens(i)).float().mean().to(stats.device)
                            for i, tr in enumerate(self.trackers)])
        return torch.cat([stats, dead[:, None]], dim=1)

    def _raise_if_nonfinite(self, values: list[list[float]], grads_ok: list[bool] | None) -> None:
        for i, row in enumerate(values):
            stats = dict(zip(_STATS, row))
            bad_loss = not all(map(_finite, (stats["loss"], stats["aux_loss"], stats["total_loss"])))
            bad_grad = grads_ok is not None and not grads_ok[i]
            if bad_loss or bad_grad:
                for opt in self.optimizers:
                    opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for sae, saved in zip(self.saes, self._buffers_before):
                        for buf, old in zip(sae.buffers(), saved):
                            buf.copy_(old)
                    for tracker, snap in zip(self.trackers, self._trackers_before):
                        tracker.restore(snap)
                what = (f"loss={stats['loss']}, aux_loss={stats['aux_loss']}" if bad_loss
                        else "non-finite gradients (a NaN on another worker reaches every worker's all-reduce)")
                raise NonFiniteLossError(f"SAE {i} ({self.configs[i].name}): {what} at step {self.steps[i] + 1}; "
                                         "optimizer step skipped, weights unchanged")

    def _accumulate(self, i: int, row: Mapping[str, float]) -> None:
        window = self._window[i]
        for key, value in row.items():
            window[key] = window.get(key, 0.0) + value
        self._window_steps[i] += 1

    def pop_window(self) -> list[dict[str, Any]]:
        """Mean of each SAE's step metrics since the last call (e.g. every ``train.log_every`` steps), then
        reset. Loss, dead fraction etc. are means over the window (the dead fraction at the end of the window is
        the last step's metrics / ``trackers[i].dead_fraction()``); ``step``/``tokens`` are the current counters."""
        out = []
        for i, window in enumerate(self._window):
            n = max(self._window_steps[i], 1)
            out.append({"sae": self.configs[i].name, "index": i, "step": self.steps[i], "tokens": self.tokens[i],
                        "window_steps": self._window_steps[i], **{k: v / n for k, v in window.items()}})
            self._window[i] = {}
            self._window_steps[i] = 0
        return out

    # ------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """``{"meta": JSON-able dict, "tensors": {name: Tensor}}``: SAE weights (``sae.{i}.*``), optimizer
        moments/steps (``optim.{i}.{param}.{key}``), trackers (``tracker.{i}.*``) and the generator state
        (``rng``). Nothing else is needed to continue training bit-identically."""
        tensors: dict[str, Tensor] = {}
        optim_meta = []
        for i, (sae, opt, tracker) in enumerate(zip(self.saes, self.optimizers, self.trackers)):
            for name, t in sae.state_dict().items():
                tensors[f"sae.{i}.{name}"] = t
            osd = opt.state_dict()
            scalars: dict[str, dict[str, Any]] = {}
            for pid, pstate in osd["state"].items():
                for key, value in pstate.items():
                    if isinstance(value, Tensor):
                        tensors[f"optim.{i}.{pid}.{key}"] = value
                    else:
                        scalars.setdefault(str(pid), {})[key] = value
            groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
            optim_meta.append({"param_groups": groups, "scalars": scalars})
            for name, t in tracker.state_dict().items():
                tensors[f"tracker.{i}.{name}"] = t
        tensors["rng"] = self.generator.get_state()
        meta = {
            "format": TRAINER_FORMAT,
            "configs": [c.to_dict() for c in self.configs],
            "train": self.train_config.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "steps": list(self.steps),
            "tokens": list(self.tokens),
            "optimizers": optim_meta,
        }
        return {"meta": meta, "tensors": tensors}

    def check_compatible(self, meta: Mapping[str, Any]) -> None:
        """Raise :class:`SAEConfigError` naming the difference if ``meta`` (a state's or checkpoint's) was
        written for other SAEs or another preprocessing."""
        if meta.get("format") != TRAINER_FORMAT:
            raise SAEConfigError(f"not an spg_dist trainer state (format {meta.get('format')!r}, expected {TRAINER_FORMAT!r})")
        found = meta["configs"]
        if len(found) != len(self.configs):
            raise SAEConfigError(f"checkpoint has {len(found)} SAEs {[SAEConfig.from_dict(c).name for c in found]}, "
                                 f"trainer has {len(self.configs)} {[c.name for c in self.configs]}")
        for i, (mine, theirs) in enumerate(zip(self.configs, found)):
            if diff := config_diff(mine, theirs):
                raise SAEConfigError(f"checkpoint SAE {i} differs from trainer SAE {i} ({mine.name}): {'; '.join(diff)}")
        stored = Preprocessing.from_dict(meta.get("preprocessing"))
        if not self.fit_preprocessing and stored != self.preprocessing:
            raise SAEConfigError(f"checkpoint preprocessing {stored} differs from the trainer's {self.preprocessing}")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (configs must match: :meth:`check_compatible`).

        Optimizer moments and step counts come from the state; hyperparameters (lr, betas, eps) from this
        trainer's TrainConfig, so a resumed run may change them deliberately. The metrics window restarts.
        """
        meta, tensors = state["meta"], state["tensors"]
        self.check_compatible(meta)
        if self.fit_preprocessing:
            self.preprocessing = Preprocessing.from_dict(meta.get("preprocessing"))
        for i, (sae, opt, tracker) in enumerate(zip(self.saes, self.optimizers, self.trackers)):
            prefix = f"sae.{i}."
            sae.load_state_dict({k[len(prefix):]: v.to(self.device) for k, v in tensors.items() if k.startswith(prefix)})
            sae.preprocessing = self.preprocessing
            om = meta["optimizers"][i]
            pstate: dict[int, dict[str, Any]] = {}
            prefix = f"optim.{i}."
            for key, value in tensors.items():
                if key.startswith(prefix):
                    pid, name = key[len(prefix):].split(".", 1)
                    pstate.setdefault(int(pid), {})[name] = value
            for pid, scalars in om.get("scalars", {}).items():
                pstate.setdefault(int(pid), {}).update(scalars)
            groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in om["param_groups"]]
            current = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            opt.load_state_dict({"state": pstate, "param_groups": groups})
            for group, keep in zip(opt.param_groups, current):
                group.update(keep)
            prefix = f"tracker.{i}."
            tracker.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.steps = [int(s) for s in meta["steps"]]
        self.tokens = [int(t) for t in meta["tokens"]]
        if "rng" in tensors:
            self.generator.set_state(tensors["rng"].to("cpu", torch.uint8))
        self._window = [{} for _ in self.configs]
        self._window_steps = [0] * len(self.configs)
        self.initialized = True


def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))
