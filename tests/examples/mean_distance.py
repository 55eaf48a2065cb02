"""A user's own detector in a few lines, run against the store like every built-in one (README, "Your own detector").

It reads the few-shot normal images of each target category that the evaluation loop hands it, keeps their mean
patch token, and scores a patch by its cosine distance to that mean; the loop does the maps, masks and metrics.
"""

from dataclasses import dataclass

import numpy as np

from spg_dist.detectors import Detector, FitData, Inputs, TokenSet, register_detector


@register_detector
class MeanDistance(Detector):
    name = "mean-distance"
    summary = "cosine distance of each patch to the mean normal patch of k shots"

    @dataclass(frozen=True)
    class Settings:
        shots: int = 4
        layer: int = -1
        pooling: str = "max"

    def inputs(self) -> Inputs:
        return Inputs(layers=(self.settings.layer,), shots=self.settings.shots)

    def fit(self, data: FitData) -> "MeanDistance":
        x = data.shots.layer().astype(np.float32)
        mean = x.reshape(-1, x.shape[-1]).mean(0)
        self.mean = mean / np.linalg.norm(mean)
        return self

    def score(self, batch: TokenSet) -> np.ndarray:
        x = batch.layer().astype(np.float32)
        return 1.0 - (x @ self.mean) / np.maximum(np.linalg.norm(x, axis=-1), 1e-12)
