"""One Stage 2 training step (pure PyTorch): tokens and masks of auxiliary images in, updated guides out.

Loss = focal (or class-balanced BCE) + λ_dice · Dice on the upsampled anomaly maps + β (‖z̃_N‖₁ + ‖z̃_A‖₁), the
L1 term only for ReLU guides: the supplement's TopK variant (``nonneg="topk"``) has none unless ``l1_with_topk``.
Adam on (z̄_N, z̄_A) only; an EMA of the coefficients is what evaluation uses.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from spg_dist.errors import SpgError
from spg_dist.guides.config import GuideConfig
from spg_dist.guides.losses import balanced_bce, dice, focal
from spg_dist.guides.model import Guides
from spg_dist.guides.scoring import upsample


class NonFiniteGuideLossError(SpgError, RuntimeError):
    """A NaN/inf guide loss; the coefficients are left as they were before the step."""


class GuideTrainer:
    def __init__(self, sae: torch.nn.Module, config: GuideConfig):
        self.config = config
        self.guides = Guides(sae, config)
        self.opt = torch.optim.Adam([self.guides.z_bar], lr=config.lr)
        self.step_count = 0
        self.curve: list[dict[str, float]] = []

    def loss(self, tokens: Tensor, masks: Tensor) -> tuple[Tensor, dict[str, float]]:
        """tokens [B, h, w, d] raw; masks [B, H, W] in {0, 1}. The row's ``l1`` is ‖z̃‖₁ always (a diagnostic);
        it enters ``loss`` only when ``config.l1_in_loss``."""
        cfg = self.config
        p = upsample(self.guides.patch_probs(tokens), masks.shape[-2:])
        y = masks.float()
        seg = focal(p, y, cfg.focal_gamma) if cfg.loss == "focal_dice" else balanced_bce(p, y)
        d = dice(p, y)
        l1 = self.guides.coefficients().sum()
        total = seg + cfg.lambda_dice * d
        if cfg.l1_in_loss:
            total = total + cfg.beta_l1 * l1
        return total, {k: float(v.detach()) for k, v in (("loss", total), ("seg", seg), ("dice", d), ("l1", l1))}

    def step(self, tokens: Tensor, masks: Tensor) -> dict[str, Any]:
        total, parts = self.loss(tokens, masks)
        if not torch.isfinite(total):
            raise NonFiniteGuideLossError(f"guide loss is {float(total.detach())} at step {self.step_count + 1}; "
                                          "check the auxiliary tokens for NaN/inf or lower --lr")
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()
        self.guides.update_ema()
        self.step_count += 1
        n_normal, n_anomaly = self.guides.active_sets(ema=False)
        row = {"step": self.step_count, **parts, "active_normal": n_normal, "active_anomaly": n_anomaly}
        self.curve.append(row)
        return row

    def fit(self, tokens: np.ndarray | Tensor, masks: np.ndarray | Tensor, device: str | torch.device = "cpu",
            on_step: Callable[[dict[str, Any]], None] | None = None) -> None:
        """``config.steps`` steps on random batches of ``config.batch_images`` images (seeded by ``config.seed``,
        sorted indices, without replacement). ``tokens [N, h, w, d]`` and ``masks [N, H, W]`` may stay fp16/uint8
        NumPy on the host: only each batch is converted and moved to ``device``. ``on_step`` sees every step's row
        (a progress bar's postfix)."""
        rng = np.random.default_rng(self.config.seed)
        n = len(tokens)
        b = min(self.config.batch_images, n)
        for _ in range(self.config.steps):
            pick = np.sort(rng.choice(n, size=b, replace=False))
            row = self.step(torch.as_tensor(tokens[pick]).float().to(device), torch.as_tensor(masks[pick]).to(device))
            if on_step is not None:
                on_step(row)
