"""The TopK sparse autoencoder (SPG Stage 1; Gao et al. 2024 conventions).

``z = Select(ReLU-after-TopK((x - b_pre) W_enc^T + b_enc))``, ``x_hat = z W_dec + b_pre``; the dictionary of the
paper is ``D = W_dec^T`` (atom ``i`` = row ``i`` of ``W_dec``, kept at unit norm). The encoder is initialised as
``D^T`` (``W_enc = W_dec``). Everything after the one dense encoder matmul is sparse (kernels.py).

The model owns its :class:`~spg_dist.sae.preprocess.Preprocessing`: ``encode``/``forward``/``encode_dense``
take RAW tokens and apply it first, so no caller can forget or re-implement it. ``decode`` returns vectors in
the SAE's (preprocessed) space; ``preprocessing.invert`` maps them back where needed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from spg_dist.sae import serialization
from spg_dist.sae.config import SAEConfig, SAEConfigError, config_diff
from spg_dist.sae.initializers import geometric_median, random_unit_rows
from spg_dist.sae.kernels import sparse_decode, sparse_encode
from spg_dist.sae.preprocess import Preprocessing
from spg_dist.sae.selection import Selection, select_batchtopk, select_threshold, select_topk

MODEL_FORMAT = "spg_dist.sae/1"


@dataclass
class SAEOutput:
    """Everything one forward produces (tensors, so the trainer can batch host syncs).

    ``x``: the preprocessed input ``[N, d]`` (float32); ``x_hat`` its reconstruction; ``values``/``indices``:
    the sparse code ``[N, m]`` (m = k for TopK, the padded width for BatchTopK; padding has value 0).
    ``loss`` = mean over tokens of ``||x - x_hat||^2`` (the paper's objective, what is minimised);
    ``fvu`` = ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` (normalised MSE, reported);
    ``aux_loss`` = AuxK error normalised the same way, ``min(n_dead / k_aux, 1) * sum ||e_hat - e||^2 / sum
    ||x - mean(x)||^2`` (as sparsify reports it; 0 when AuxK is off or nothing is dead);
    ``total`` = ``loss + aux_coef * min(n_dead / k_aux, 1) * sum ||e_hat - e||^2 / N``, i.e. the AuxK term in the
    SAME units as ``loss`` (per-token squared error), which is what makes ``aux_coef = 1/32`` mean what it means
    in Gao et al. (there both terms are MSEs).
    """

    x: Tensor
    x_hat: Tensor
    values: Tensor
    indices: Tensor
    loss: Tensor
    fvu: Tensor
    aux_loss: Tensor
    total: Tensor
    num_dead: int = 0


def aux_scale(e_hat: Tensor, residual: Tensor) -> Tensor:
    """Per-token scale in [0, 1] (no gradient) applied to the AuxK reconstruction: the least-squares scale onto
    the residual when the reconstruction overshoots, 1 (plain AuxK) when it undershoots.

    Why: a latent counted dead after a short window can still have large pre-activations; summed over k_aux of
    them the auxiliary reconstruction overshoots the (small) residual and the plain AuxK gradient then mostly
    shrinks those activations, killing more latents (bench/sae.py: 67 % dead with plain AuxK vs 15 % without).
    Scaling an overshoot down removes that pressure and keeps the part about where dead atoms point; an
    undershoot (truly dead latents, tiny activations) keeps the plain gradient that grows them back, which is
    AuxK's revival. ``aux_fit_scale=False`` gives Gao et al.'s plain form.
    """
    with torch.no_grad():
        num = (e_hat * residual).sum(-1, keepdim=True)
        den = e_hat.pow(2).sum(-1, keepdim=True).clamp_min(torch.finfo(e_hat.dtype).tiny)
        return (num / den).clamp(0, 1)


class TopKSAE(nn.Module):
    """TopK / BatchTopK sparse autoencoder with parameters ``b_pre [d]``, ``W_enc [C, d]``, ``b_enc [C]``,
    ``W_dec [C, d]`` and one buffer ``threshold`` (BatchTopK's inference threshold, -1 until trained).

    Args:
        config: shape and loss options (validated).
        preprocessing: token preprocessing recorded with the model (identity if None).
        seed / generator: source of the random unit-norm atoms (a generator wins over the seed), drawn on the
            CPU so every worker and device builds the same initial model from the same seed.
        device: where the parameters live.

    BatchTopK: in training the ``N * k`` largest pre-activations of the batch are kept (selection.py), and the
    smallest positive kept activation updates an EMA (decay :attr:`THRESHOLD_DECAY`) stored in ``threshold``;
    in eval mode each token keeps the latents whose pre-activation exceeds ``threshold`` (batch-independent
    codes). Before any training step (threshold < 0) eval falls back to per-token TopK.
    """

    THRESHOLD_DECAY = 0.99

    def __init__(self, config: SAEConfig, preprocessing: Preprocessing | None = None, *, seed: int = 0,
                 generator: torch.Generator | None = None, device: str | torch.device | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.preprocessing = preprocessing if preprocessing is not None else Preprocessing()  # checked on set
        gen = generator if generator is not None else torch.Generator().manual_seed(seed)
        atoms = random_unit_rows(config.C, config.d, gen).to(device)
        self.b_pre = nn.Parameter(torch.zeros(config.d, device=device))
        self.W_enc = nn.Parameter(atoms.clone())
        self.b_enc = nn.Parameter(torch.zeros(config.C, device=device))
        self.W_dec = nn.Parameter(atoms)
        self.register_buffer("threshold", torch.tensor(-1.0, device=device))

    # ----------------------------------------------------------------------------------------------- basics
    @property
    def d(self) -> int:
        return self.config.d

    @property
    def C(self) -> int:
        return self.config.C

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def name(self) -> str:
        return self.config.name

    def extra_repr(self) -> str:
        return f"{self.name}, d={self.d}, preprocessing={self.preprocessing}"

    @property
    def raw_dim(self) -> int:
        """Dimension of the raw tokens this SAE reads (``d`` minus what the preprocessing appends)."""
        return self.d - self.preprocessing.extra_dims

    def _check_preprocessing(self, pre: Preprocessing) -> None:
        raw = self.config.d - pre.extra_dims
        if raw < 1 or (pre.mean is not None and len(pre.mean) != raw):
            raise SAEConfigError(f"{self.name}: preprocessing ({pre.describe()}) does not fit d={self.config.d}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "preprocessing":  # a preprocessing of another input dim would silently break every stage
            self._check_preprocessing(value)
        super().__setattr__(name, value)

    def _check_tokens(self, x: Tensor) -> None:
        if x.dim() < 1 or x.shape[-1] != self.raw_dim:
            got = x.shape[-1] if x.dim() else "a scalar"
            extra = f", {self.d - self.raw_dim} of them appended by its preprocessing" if self.raw_dim != self.d else ""
            raise ValueError(f"token dimension {got} does not match the SAE's input dim {self.raw_dim} "
                             f"({self.name}, d={self.d}{extra}); tokens must be [..., {self.raw_dim}]")

    def preprocess(self, x: Tensor) -> Tensor:
        """Raw tokens ``[..., raw_dim]`` -> preprocessed float32 ``[N, d]`` (dimension checked first). With
        per-image centring, ``x`` must be whole images ``[B, *patch_axes, raw_dim]``."""
        self._check_tokens(x)
        return self.preprocessing.apply(x).reshape(-1, self.d)

    def _selector(self) -> "partial[Selection]":
        """The sparsifier for the current mode (see the class docstring)."""
        if self.config.sparsifier == "batchtopk":
            if self.training:
                return partial(select_batchtopk, k=self.k)
            if float(self.threshold) >= 0:
                return partial(select_threshold, threshold=self.threshold)
        return partial(select_topk, k=self.k)

    # ------------------------------------------------------------------------------------------ encode/decode
    def _encode_preprocessed(self, xp: Tensor, dead_mask: Tensor | None = None,
                             k_aux: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return sparse_encode(xp - self.b_pre, self.W_enc, self.b_enc, self._selector(), dead_mask, k_aux)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Raw tokens ``[..., d]`` -> ``(values [..., m], indices [..., m])``, values >= 0.

        TopK: m = k, the k largest pre-activations of each token, then ReLU. BatchTopK: m = the padded width
        of this batch's selection (see the class docstring), padding slots have value 0.
        """
        lead = x.shape[:-1]
        values, indices, _, _ = self._encode_preprocessed(self.preprocess(x))
        return values.reshape(*lead, -1), indices.reshape(*lead, -1)

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """Sparse code ``[..., m]`` -> reconstruction ``[..., d]`` in the SAE's (preprocessed) space:
        the embedding-bag sum of the selected atoms plus ``b_pre`` (O(m * d) per token)."""
        lead = indices.shape[:-1]
        m = indices.shape[-1]
        x_hat = sparse_decode(values.reshape(-1, m), indices.reshape(-1, m), self.W_dec) + self.b_pre
        return x_hat.reshape(*lead, self.d)

    def encode_dense(self, x: Tensor) -> Tensor:
        """Dense reference of :meth:`encode`: the code as a dense ``[N, C]`` matrix, by plain autograd ops
        (for tests and small analyses; O(N * C) memory)."""
        xp = self.preprocess(x)
        pre = (xp - self.b_pre) @ self.W_enc.t() + self.b_enc
        pre_values, indices, valid = self._selector()(pre)
        values = pre_values.relu()
        if valid is not None:
            values = values.masked_fill(~valid, 0)
        return torch.zeros_like(pre).scatter(1, indices, values)

    def decode_dense(self, z: Tensor) -> Tensor:
        """Dense reference of :meth:`decode`: ``z @ W_dec + b_pre``."""
        return z @ self.W_dec + self.b_pre

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> SAEOutput:
        """Raw tokens ``[..., d]`` (flattened to ``[N, d]``) -> :class:`SAEOutput` (losses and code).

        ``dead_mask [C]`` (bool, from a :class:`~spg_dist.sae.tracker.DeadLatentTracker`) enables AuxK when the
        config has ``auxk`` and some latent is dead.
        """
        return self.forward_preprocessed(self.preprocess(x), dead_mask)

    def forward_preprocessed(self, xp: Tensor, dead_mask: Tensor | None = None) -> SAEOutput:
        """:meth:`forward` on tokens that already went through ``self.preprocessing.apply`` (lets several SAEs
        sharing one preprocessing apply it once per batch; see MultiSAE)."""
        if xp.dim() != 2 or xp.shape[-1] != self.d:
            self._check_tokens(xp)
            raise ValueError(f"preprocessed tokens must be [N, {self.d}], got {tuple(xp.shape)}")
        cfg = self.config
        num_dead, k_aux = 0, 0
        if cfg.auxk and dead_mask is not None:
            if dead_mask.shape != (self.C,):
                raise ValueError(f"dead_mask must be [C]=[{self.C}], got {tuple(dead_mask.shape)}")
            num_dead = int(dead_mask.sum())
            k_aux = min(cfg.k_aux_effective, num_dead)
        values, indices, aux_values, aux_indices = self._encode_preprocessed(
            xp, dead_mask.to(device=xp.device, dtype=torch.bool) if k_aux else None, k_aux)
        x_hat = sparse_decode(values, indices, self.W_dec) + self.b_pre
        residual = xp - x_hat.to(xp.dtype)
        n = xp.shape[0]
        sse = residual.pow(2).sum()
        total_variance = (xp - xp.mean(0)).pow(2).sum().clamp_min(torch.finfo(torch.float32).tiny)
        loss = sse / n
        fvu = sse / total_variance
        if k_aux > 0:
            scale = min(num_dead / cfg.k_aux_effective, 1.0)
            e_hat = sparse_decode(aux_values, aux_indices, self.W_dec)  # no b_pre: it models the residual
            if cfg.aux_fit_scale:
                e_hat = e_hat * aux_scale(e_hat, residual)
            aux_sse = (e_hat.to(xp.dtype) - residual.detach()).pow(2).sum()
            aux_loss = scale * aux_sse / total_variance
            total = loss + cfg.aux_coef * scale * aux_sse / n
        else:
            aux_loss = sse.new_zeros(())
            total = loss
        if self.training and cfg.sparsifier == "batchtopk":
            self._update_threshold(values)
        return SAEOutput(x=xp, x_hat=x_hat, values=values, indices=indices, loss=loss, fvu=fvu,
                         aux_loss=aux_loss, total=total, num_dead=num_dead)

    @torch.no_grad()
    def _update_threshold(self, values: Tensor) -> None:
        """EMA of the smallest positive kept activation (BatchTopK). Without host sync; a batch with no
        positive (or only non-finite) activation leaves the threshold unchanged, so a NaN batch cannot
        poison the saved model."""
        batch_min = torch.where(values > 0, values.float(), torch.full_like(values, float("inf"), dtype=torch.float32)).min()
        ok = torch.isfinite(batch_min)
        old = self.threshold
        ema = torch.where(old < 0, batch_min, self.THRESHOLD_DECAY * old + (1 - self.THRESHOLD_DECAY) * batch_min)
        self.threshold.copy_(torch.where(ok, ema, old))

    # -------------------------------------------------------------------------------------------- training aids
    def _sample(self, sample: Tensor, preprocessed: bool) -> Tensor:
        return sample.reshape(-1, self.d).float() if preprocessed else self.preprocess(sample)

    @torch.no_grad()
    def init_b_pre(self, sample: Tensor, preprocessed: bool = False) -> None:
        """Set ``b_pre`` from RAW tokens (or, with ``preprocessed``, tokens already through the preprocessing,
        ``[N, d]``) per ``config.init_b_pre`` (geometric median, mean, zeros), in preprocessed space (where
        ``b_pre`` lives)."""
        mode = self.config.init_b_pre
        if mode == "zeros":
            self.b_pre.zero_()
            return
        xp = self._sample(sample, preprocessed)
        centre = geometric_median(xp) if mode == "geometric_median" else xp.double().mean(0)
        self.b_pre.copy_(centre.to(self.b_pre))

    @torch.no_grad()
    def init_encoder_scale(self, sample: Tensor, preprocessed: bool = False) -> float:
        """Scale ``W_enc`` (initialised as ``D^T``) by the factor that best reconstructs ``sample``.

        With ``b_enc = 0`` the codes are positively homogeneous in the encoder's scale (TopK selects the same
        latents), so the reconstruction error is a quadratic in that scale with the closed-form minimum
        ``s = <x - b_pre, x0> / ||x0||^2``, ``x0`` the decoded codes at scale 1. Unit-norm encoder rows
        overshoot (k projections add up); this starts training from the best scale instead, which on the
        benchmark tokens cut the NMSE after 20 steps from 0.75 to below a peer that starts at ~0.58.
        Returns the factor applied. ``preprocessed``: as in :meth:`init_b_pre`.
        """
        xp = self._sample(sample, preprocessed)
        values, indices, _, _ = self._encode_preprocessed(xp)
        x0 = self.decode(values, indices) - self.b_pre
        xp = xp - self.b_pre
        denom = float(x0.pow(2).sum())
        if denom <= 0 or not torch.isfinite(torch.tensor(denom)):
            return 1.0
        scale = float((xp * x0).sum()) / denom
        if not (0.0 < scale < float("inf")):
            return 1.0
        self.W_enc.mul_(scale)
        return scale

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Remove from each atom's gradient its component along the atom.

        Atoms are renormalised after every step; the parallel component would only change their norm (undone
        by :meth:`normalize_decoder`) while still feeding Adam's moment estimates. Call after backward, before
        the optimizer step (Gao et al., sparsify).
        """
        grad = self.W_dec.grad
        if grad is None:
            return
        w = self.W_dec.data
        coef = (grad * w).sum(-1, keepdim=True) / (w * w).sum(-1, keepdim=True).clamp_min(1e-12)
        grad.sub_(coef * w)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Scale every atom (row of ``W_dec``) to unit norm (keeps the code magnitudes meaningful and the L0/
        reconstruction trade-off from being gamed by shrinking atoms)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    # ------------------------------------------------------------------------------------------- persistence
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``, but a state of another shape raises :class:`SAEConfigError` naming
        both shapes (instead of a size-mismatch RuntimeError per tensor). A state without ``threshold`` (older
        writers) loads as "unset"."""
        state = dict(state_dict)
        W = state.get("W_enc")
        b = state.get("b_pre")
        if W is not None and b is not None and (tuple(W.shape) != (self.C, self.d) or tuple(b.shape) != (self.d,)):
            raise SAEConfigError(f"state is for d={W.shape[-1]}, C={W.shape[0]} but this SAE ({self.name}) has "
                                 f"d={self.d}, C={self.C}")
        state.setdefault("threshold", torch.tensor(-1.0))
        return super().load_state_dict(state, strict=strict, assign=assign)

    def _payload(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        meta = {"format": MODEL_FORMAT, "config": self.config.to_dict(),
                "preprocessing": self.preprocessing.to_dict()}
        return dict(self.state_dict()), meta

    def save(self, path: str | os.PathLike) -> None:
        """Write weights + config + preprocessing to one safetensors file (atomic)."""
        tensors, meta = self._payload()
        serialization.save_file(path, tensors, meta)

    def to_bytes(self) -> bytes:
        """The same content as :meth:`save`, as bytes (for ``sae_models.weights``)."""
        tensors, meta = self._payload()
        return serialization.pack(tensors, meta)

    @classmethod
    def _from_payload(cls, tensors: dict[str, Tensor], meta: dict[str, Any], device: str | torch.device | None,
                      config: SAEConfig | None, where: str) -> "TopKSAE":
        if meta.get("format") != MODEL_FORMAT:
            raise SAEConfigError(f"{where}: not an spg_dist SAE (format {meta.get('format')!r}, expected {MODEL_FORMAT!r})")
        found = SAEConfig.from_dict(meta["config"])
        if config is not None and (diff := config_diff(config, found)):
            raise SAEConfigError(f"{where}: stored SAE {found.name} does not match the expected config: {'; '.join(diff)}")
        sae = cls(found, Preprocessing.from_dict(meta.get("preprocessing")), device=device)
        sae.load_state_dict({name: t.to(device) if device is not None else t for name, t in tensors.items()})
        return sae

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None,
             config: SAEConfig | None = None) -> "TopKSAE":
        """Build the SAE stored at ``path``. With ``config``, a stored SAE of another config raises
        :class:`SAEConfigError` naming the differing fields."""
        tensors, meta = serialization.load_file(path)
        return cls._from_payload(tensors, meta, device, config, str(path))

    @classmethod
    def from_bytes(cls, data: bytes, device: str | torch.device | None = None,
                   config: SAEConfig | None = None) -> "TopKSAE":
        """Inverse of :meth:`to_bytes` (same checks as :meth:`load`)."""
        tensors, meta = serialization.unpack(data)
        return cls._from_payload(tensors, meta, device, config, "SAE bytes")

    def load_weights(self, source: str | os.PathLike | bytes) -> None:
        """Load a stored SAE (path or bytes) INTO this one. Its config must equal ours (else
        :class:`SAEConfigError` naming the differences, e.g. ``k: expected 32, found 64``); its preprocessing
        replaces ours, because weights are only meaningful with the preprocessing they were trained with."""
        loaded = TopKSAE.from_bytes(source) if isinstance(source, (bytes, bytearray)) else TopKSAE.load(source)
        if diff := config_diff(self.config, loaded.config):
            raise SAEConfigError(f"cannot load {loaded.name} into {self.name}: {'; '.join(diff)}")
        self.load_state_dict(loaded.state_dict())
        self.preprocessing = loaded.preprocessing
