"""Guides: two non-negative coefficient vectors over the frozen SAE dictionary, and the per-patch scoring rule.

``g = D z̃`` with ``z̃ = ReLU(z̄)`` (or TopK), ``ℓ = cos(f, g)``, ``p_A = softmax(ℓ_N/T, ℓ_A/T)_A``.
The SAE is frozen; only ``z̄_N, z̄_A`` learn. Tokens are mapped into the SAE's input space by the SAE's own
preprocessing (one function everywhere); Eq. 9 compares that vector with the guides as it is (the default), the
``subtract_b_pre`` option compares ``f - b_pre`` instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from spg_dist.guides.config import GuideConfig


class Guides(nn.Module):
    def __init__(self, sae: nn.Module, config: GuideConfig):
        super().__init__()
        self.config = config
        self.sae = sae.eval()
        for p in self.sae.parameters():
            p.requires_grad_(False)
        C = sae.W_dec.shape[0]
        g = torch.Generator().manual_seed(config.seed)
        self.z_bar = nn.Parameter(config.init * (1 + 0.1 * torch.rand(2, C, generator=g)))  # rows: normal, anomaly
        self.register_buffer("z_ema", self.z_bar.detach().clone())
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))

    def coefficients(self, ema: bool = False) -> Tensor:
        """z̃ [2, C] (normal, anomaly), non-negative."""
        z = self.z_ema if ema else self.z_bar
        if self.config.nonneg == "relu":
            return torch.relu(z)
        vals, idx = z.topk(self.config.k_g, dim=-1)
        return torch.zeros_like(z).scatter(-1, idx, torch.relu(vals))

    def guides(self, ema: bool = False) -> Tensor:
        """g [2, d] = z̃ D (atoms are the rows of W_dec)."""
        return self.coefficients(ema) @ self.sae.W_dec

    def features(self, tokens: Tensor) -> Tensor:
        """Raw tokens of whole images [B, h, w, d] -> the vectors compared with the guides [B, h, w, d_sae]."""
        f = self.sae.preprocess(tokens).reshape(*tokens.shape[:-1], -1)  # the SAE's own preprocessing
        return f - self.sae.b_pre if self.config.subtract_b_pre else f

    def patch_probs(self, tokens: Tensor, ema: bool = False) -> Tensor:
        """Anomaly probability per patch: tokens [B, h, w, d] -> p_A [B, h, w]."""
        f = torch.nn.functional.normalize(self.features(tokens.float()), dim=-1)
        g = torch.nn.functional.normalize(self.guides(ema), dim=-1)
        logits = f @ g.T / self.config.temperature  # [B, h, w, 2]
        return torch.softmax(logits, dim=-1)[..., 1]

    def ema_decay(self, t: int) -> float:
        """Decay of the EMA update after optimizer step t + 1 (t = updates done so far): the paper's constant
        ``ema``, or with ``ema_warmup`` the usual warm-up ``min(ema, (1 + t) / (10 + t))`` (a plain 0.999 EMA of a
        150-step run is still ~86 % its initial value, so short runs need it)."""
        return min(self.config.ema, (1 + t) / (10 + t)) if self.config.ema_warmup else self.config.ema

    @torch.no_grad()
    def update_ema(self) -> None:
        """z_ema <- decay·z_ema + (1 - decay)·z̄ (z_ema starts at the initial z̄); see :meth:`ema_decay`."""
        t = int(self.ema_steps)
        decay = self.ema_decay(t)
        self.z_ema.mul_(decay).add_(self.z_bar.detach(), alpha=1 - decay)
        self.ema_steps += 1

    def active_sets(self, ema: bool = True) -> tuple[int, int]:
        """Sizes of supp(z̃_N), supp(z̃_A)."""
        z = self.coefficients(ema)
        return int((z[0] > 0).sum()), int((z[1] > 0).sum())
