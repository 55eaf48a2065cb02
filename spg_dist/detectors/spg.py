"""SPG (Sparse-Projected Guides) as one detector among the others: guides over a frozen SAE dictionary, learned
on a labelled auxiliary dataset and applied zero-shot (``spg_dist.guides`` holds the method itself).

The SAE is a model, not a setting: ``spg detect --method spg --param sae=ID`` (or ``guides=ID`` for guides already
in the store) resolves it from the store and :meth:`SPGDetector.attach` hands it over with the layer it was
trained on. ``fit`` trains the guide pair on the auxiliary tokens and masks; ``score`` is the anomaly probability
``p_A`` per patch; image scores pool the upsampled map (``max`` by default, ``lse:TAU`` as Eq. 12).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch

from spg_dist.detectors.base import ArrayLike, Detector, DetectorConfigError, FitData, Inputs, TokenSet, to_tensor
from spg_dist.guides import GuideConfig, GuideTrainer, Guides

_GUIDE_FIELDS = ("steps", "lr", "temperature", "nonneg", "k_g", "subtract_b_pre", "loss", "beta_l1", "ema", "seed",
                 "batch_images", "ema_warmup", "l1_with_topk")


class SPGDetector(Detector):
    name = "spg"
    summary = "SPG: normal/anomaly guides over a frozen SAE dictionary, trained on an auxiliary dataset (zero-shot)"
    trainable = True

    @dataclass(frozen=True)
    class Settings:
        sae: str = ""  # sae_id of the frozen SAE (spg detect resolves it); or:
        guides: str = ""  # guide_id of stored guides (their SAE and config come with them)
        preset: str = "paper"  # paper | classical (GuideConfig.preset)
        steps: int | None = None
        lr: float | None = None
        temperature: float | None = None
        nonneg: str | None = None
        k_g: int | None = None
        subtract_b_pre: bool | None = None
        loss: str | None = None
        beta_l1: float | None = None
        ema: float | None = None
        ema_warmup: bool | None = None
        l1_with_topk: bool | None = None
        batch_images: int | None = None
        seed: int | None = None
        mask_size: int | None = None  # resolution of the aux masks the loss sees (None: 4 x the token grid)
        pooling: str = "max"

    def __init__(self, settings: Any = None, model: torch.nn.Module | None = None, layer: int | None = None,
                 device: str = "cpu", **overrides: Any) -> None:
        """``model``: the frozen SAE (or attach it later); ``overrides``: settings as ``--param`` values."""
        super().__init__(settings, **overrides)
        self.device = device
        self.sae: torch.nn.Module | None = None
        self.layer = layer
        self.guides: Guides | None = None
        self.curve: list[dict[str, float]] = []
        self.steps_done = 0
        if model is not None:
            self.attach(model, layer if layer is not None else -1)

    def guide_config(self) -> GuideConfig:
        s = self.settings
        try:
            base = GuideConfig.preset(s.preset)
            return dataclasses.replace(base, **{f: getattr(s, f) for f in _GUIDE_FIELDS if getattr(s, f) is not None})
        except (TypeError, ValueError) as e:
            raise DetectorConfigError(f"spg: {e}") from None

    def attach(self, sae: torch.nn.Module, layer: int, config: GuideConfig | None = None) -> "SPGDetector":
        """Give the detector its frozen SAE (and the stored layer the SAE reads)."""
        self.sae, self.layer = sae.to(self.device).eval(), int(layer)
        self.guides = Guides(self.sae, config or self.guide_config()).to(self.device)
        return self

    def _need_sae(self) -> Guides:
        if self.guides is None:
            raise DetectorConfigError("spg needs an SAE: pass --param sae=SAE_ID (see `spg saes`) or "
                                      "--param guides=GUIDE_ID")
        return self.guides

    def inputs(self) -> Inputs:
        return Inputs(layers=(self.layer if self.layer is not None else -1,), aux=not self.settings.guides,
                      scope="dataset", mask_size=self.settings.mask_size)

    @property
    def pool_on(self) -> str:
        return "map"

    def params(self) -> dict[str, Any]:
        """Settings plus the guide config actually in use (a stored pair brings its own)."""
        p = super().params()
        if self.guides is not None:
            p["guide_config"] = self.guides.config.to_dict()
        return p

    def fit(self, data: FitData, on_step: Callable[[dict[str, Any]], None] | None = None) -> "SPGDetector":
        guides = self._need_sae()
        aux = data.need("aux", "spg")
        if aux.masks is None:
            raise DetectorConfigError("spg: the auxiliary set has no masks")
        trainer = GuideTrainer(self.sae, guides.config)
        trainer.guides.to(self.device)
        trainer.fit(aux.tokens[self.layer] if self.layer in aux.tokens else aux.layer(), aux.masks, self.device,
                    on_step=on_step)
        self.guides, self.curve, self.steps_done = trainer.guides, trainer.curve, trainer.step_count
        return self

    def coefficients(self) -> torch.Tensor:
        """The EMA coefficients z̃ ``[2, C]`` (normal, anomaly) that scoring uses."""
        return self._need_sae().coefficients(ema=True).detach().float().cpu()

    @torch.no_grad()
    def score(self, batch: TokenSet | ArrayLike) -> np.ndarray:
        guides = self._need_sae()
        if isinstance(batch, TokenSet):
            x = batch.tokens[self.layer] if self.layer in batch.tokens else batch.layer()
        else:
            x = batch
        p = guides.patch_probs(to_tensor(x, self.device), ema=True)
        return p.float().cpu().numpy()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"coefficients": self.coefficients()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        guides = self._need_sae()
        z = torch.as_tensor(state["coefficients"], dtype=guides.z_ema.dtype, device=guides.z_ema.device)
        if z.shape != guides.z_ema.shape:
            raise DetectorConfigError(f"spg: coefficients of shape {tuple(z.shape)} for an SAE with "
                                      f"C = {guides.z_ema.shape[1]}")
        with torch.no_grad():
            guides.z_ema.copy_(z)
            guides.z_bar.copy_(z)
        guides.eval()


__all__ = ["SPGDetector"]
