"""Dead-latent bookkeeping: how long since each latent last fired, and how often it fires.

A latent is *dead* when it has not fired (been selected with a positive value) in the last ``dead_tokens``
training tokens (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"). This is the one definition of
"dead" in spg_dist: AuxK (model.py) uses it, the trainer logs it (the fraction after each step), and
:meth:`DeadLatentTracker.record` stores it with the model (``sae_models.metrics["latents"]``), which the SAE
figures and ``spg atoms stats`` read back. A latent that merely never fired on some set of *encoded* images is
"silent" there, not dead. Firing counts feed the log-frequency histogram stored with each model.

Clock semantics (what makes the distributed cases exact): ``tokens_seen`` is a *global* token clock, advanced
by ``n_tokens`` = the number of tokens of the whole step across all workers; ``tokens_since_fired[c]`` is that
clock's distance to the end of the last step in which latent ``c`` fired, at step granularity. Two ways to
stay consistent across workers:

* online: pass ``fired_reduce`` (e.g. an all-reduce MAX of the fired mask), then every worker holds the
  global tracker after every step;
* offline: each worker tracks its own tokens (still advancing the global clock) and :meth:`merge` combines
  the trackers afterwards: elementwise minimum of ``tokens_since_fired`` (a latent fired globally when it fired
  on any worker), sum of firing counts and of observed tokens. This equals one tracker that saw every token.

``fire_counts`` and ``tokens_observed`` are always local (tokens this tracker actually saw), so firing
frequencies stay exact under both schemes once merged (or SUM-reduced by the caller).
"""

from __future__ import annotations

import base64
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor


DEAD_DEFINITION = "not fired in the last dead_tokens training tokens (Gao et al. 2024)"
RECORD_FORMAT = "spg_dist.sae.latents/1"


def pack_mask(mask: Any) -> str:
    """Bool ``[C]`` as base64 of its little-endian packed bits (C / 8 bytes: compact enough for a JSON column)."""
    m = np.asarray(mask.detach().cpu().numpy() if isinstance(mask, Tensor) else mask, dtype=bool).reshape(-1)
    return base64.b64encode(np.packbits(m, bitorder="little").tobytes()).decode("ascii")


def unpack_mask(packed: str, C: int) -> np.ndarray:
    """Inverse of :func:`pack_mask`: bool ``[C]``."""
    bits = np.frombuffer(base64.b64decode(packed), dtype=np.uint8)
    return np.unpackbits(bits, count=int(C), bitorder="little").astype(bool)


class _HybridMethod:
    """``Cls.merge([a, b])`` and ``a.merge([b])`` (or ``a.merge(b)``) from one definition."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj: Any, owner: type) -> Callable[..., Any]:
        if obj is None:
            return lambda *trackers: self.func(owner, _flatten(trackers))
        return lambda *others: self.func(owner, [obj, *_flatten(others)])


def _flatten(items: Iterable[Any]) -> list["DeadLatentTracker"]:
    out: list[DeadLatentTracker] = []
    for item in items:
        if isinstance(item, DeadLatentTracker):
            out.append(item)
        else:
            out.extend(item)
    return out


class DeadLatentTracker:
    """Per-latent ``tokens_since_fired`` (LongTensor [C]) and ``fire_counts`` (LongTensor [C]).

    Args:
        C: number of latents.
        dead_tokens: default threshold of :meth:`dead_mask` / :meth:`dead_fraction`.
        device: where the counters live (the model's device: updates never leave it).
    """

    def __init__(self, C: int, dead_tokens: int = 10_000_000, device: str | torch.device | None = None) -> None:
        self.C = int(C)
        self.dead_tokens = int(dead_tokens)
        self.tokens_since_fired = torch.zeros(self.C, dtype=torch.long, device=device)
        self.fire_counts = torch.zeros(self.C, dtype=torch.long, device=device)
        self.tokens_seen = 0  # global clock
        self.tokens_observed = 0  # tokens this tracker actually saw

    @property
    def device(self) -> torch.device:
        return self.tokens_since_fired.device

    def to(self, device: str | torch.device) -> "DeadLatentTracker":
        self.tokens_since_fired = self.tokens_since_fired.to(device)
        self.fire_counts = self.fire_counts.to(device)
        return self

    @torch.no_grad()
    def update(self, indices: Tensor, values: Tensor, n_tokens: int | None = None,
               fired_reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """Account one step: ``indices``/``values`` ``[N, m]`` is this worker's code of the step.

        ``n_tokens``: tokens of the whole step on all workers (defaults to this worker's N). ``fired_reduce``:
        optional callable combining the local fired mask (bool ``[C]``) across workers (e.g. all-reduce MAX);
        it may return any dtype, nonzero meaning fired. No host sync.
        """
        local_tokens = int(indices.shape[0]) if indices.dim() > 1 else 1
        n_tokens = local_tokens if n_tokens is None else int(n_tokens)
        idx = indices.reshape(-1).to(self.device)
        active = (values > 0).reshape(-1).to(device=self.device, dtype=torch.long)
        step_counts = torch.zeros(self.C, dtype=torch.long, device=self.device).index_add_(0, idx, active)
        self.fire_counts += step_counts
        fired = step_counts > 0  # (index_add rather than boolean indexing/bincount: no host sync on CUDA)
        if fired_reduce is not None:
            fired = fired_reduce(fired).to(self.device) != 0
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired.masked_fill_(fired, 0)
        self.tokens_seen += n_tokens
        self.tokens_observed += local_tokens

    def dead_mask(self, threshold: int | None = None) -> Tensor:
        """Bool ``[C]``: latents that have not fired for more than ``threshold`` tokens (default
        ``dead_tokens``). Strictly more, so nothing is dead before the clock passes the threshold."""
        return self.tokens_since_fired > (self.dead_tokens if threshold is None else int(threshold))

    def dead_fraction(self, threshold: int | None = None) -> float:
        """Fraction of dead latents at ``threshold`` (default ``dead_tokens``); host sync."""
        return float(self.dead_mask(threshold).float().mean())

    def firing_frequency(self) -> Tensor:
        """Fraction of observed tokens on which each latent fired (float64 ``[C]``)."""
        return self.fire_counts.double() / max(self.tokens_observed, 1)

    def record(self, bins: int = 50) -> dict[str, Any]:
        """JSON-able summary stored with the model (``sae_models.metrics["latents"]``); host sync.

        ``dead_tokens``/``tokens_seen``/``n_dead``/``dead_fraction``/``dead_mask`` (packed, :func:`unpack_mask`)
        are the one definition of dead at the end of training, i.e. exactly :meth:`dead_mask` and
        :meth:`dead_fraction` now. The firing-frequency histogram (fires per observed token, log10 bins
        ``log10_freq_edges``) is kept as counts split into latents alive / dead by that definition, plus the
        latents that never fired at all (no logarithm), so a figure can be redrawn without per-latent arrays.
        """
        from spg_dist.sae.metrics import firing_histogram_counts

        dead = self.dead_mask().cpu().numpy()
        hist = firing_histogram_counts(self.fire_counts, self.tokens_observed, dead, bins)
        since = self.tokens_since_fired.cpu().numpy()
        return {
            **hist,
            "format": RECORD_FORMAT,
            "definition": DEAD_DEFINITION,
            "dead_tokens": self.dead_tokens,
            "tokens_seen": int(self.tokens_seen),
            "dead_fraction": float(dead.mean()) if self.C else 0.0,
            "dead_mask": pack_mask(dead),
            "max_tokens_since_fired": int(since.max()) if self.C else 0,
        }

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (safetensors-ready); scalars as 0-d int64 tensors."""
        return {
            "tokens_since_fired": self.tokens_since_fired.clone(),
            "fire_counts": self.fire_counts.clone(),
            "tokens_seen": torch.tensor(self.tokens_seen, dtype=torch.long),
            "tokens_observed": torch.tensor(self.tokens_observed, dtype=torch.long),
            "dead_tokens": torch.tensor(self.dead_tokens, dtype=torch.long),
        }

    def snapshot(self) -> tuple[Tensor, Tensor, int, int]:
        """Copy of the mutable state (:meth:`restore` puts it back): lets a rejected step leave no trace."""
        return self.tokens_since_fired.clone(), self.fire_counts.clone(), self.tokens_seen, self.tokens_observed

    def restore(self, snap: tuple[Tensor, Tensor, int, int]) -> None:
        since, counts, self.tokens_seen, self.tokens_observed = snap
        self.tokens_since_fired.copy_(since)
        self.fire_counts.copy_(counts)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        since = state["tokens_since_fired"]
        if since.shape != (self.C,):
            raise ValueError(f"tracker state has {tuple(since.shape)} latents, this tracker has C={self.C}")
        self.tokens_since_fired = since.to(device=self.device, dtype=torch.long).clone()
        self.fire_counts = state["fire_counts"].to(device=self.device, dtype=torch.long).clone()
        self.tokens_seen = int(state["tokens_seen"])
        self.tokens_observed = int(state["tokens_observed"])
        # dead_tokens is configuration: the current one wins over the stored one (kept for provenance).

    def _merge(cls, trackers: Sequence["DeadLatentTracker"]) -> "DeadLatentTracker":
        """Combine trackers of several workers into a new one (see the module docstring).

        Totals are aligned first: a tracker whose clock is behind (``tokens_seen`` smaller, e.g. it stopped
        earlier) has its ``tokens_since_fired`` extended by the difference, i.e. it is treated as having seen
        no firing since it stopped. Then elementwise min of since-fired, max of clocks, sum of counts and of
        observed tokens. Usable as ``DeadLatentTracker.merge([a, b])`` or ``a.merge(b)``.
        """
        if not trackers:
            raise ValueError("merge: no trackers")
        first = trackers[0]
        if any(t.C != first.C for t in trackers):
            raise ValueError(f"merge: trackers of different sizes {[t.C for t in trackers]}")
        clock = max(t.tokens_seen for t in trackers)
        out = cls(first.C, first.dead_tokens, device=first.device)
        since = torch.stack([t.tokens_since_fired.to(first.device) + (clock - t.tokens_seen) for t in trackers])
        out.tokens_since_fired = since.min(dim=0).values
        out.fire_counts = torch.stack([t.fire_counts.to(first.device) for t in trackers]).sum(0)
        out.tokens_seen = clock
        out.tokens_observed = sum(t.tokens_observed for t in trackers)
        return out

    merge = _HybridMethod(_merge)
