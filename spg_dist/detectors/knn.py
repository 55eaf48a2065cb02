"""AnomalyDINO-style few-shot kNN: a memory bank of the normal patch tokens of k shots of the target category;
patch score = cosine distance to the nearest bank patch; image score = mean of the top 1 % patch scores.

Exact search (chunked matmul, never a full query x bank matrix) for small banks; above ``approximate_above``
bank vectors (``index="auto"``) or always (``index="approximate"``) the search goes through an approximate
:class:`NeighbourIndex` made by ``index_factory``: ``spg detect`` passes one backed by a LanceDB vector index on a
bank table in the store (``spg_dist.store.banks``), so large banks are indexed once and reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import torch

from spg_dist.detectors.base import (ArrayLike, Detector, DetectorConfigError, FitData, Inputs, TokenSet,
                                     check_tokens, l2_normalize, to_tensor)

INDEX_MODES = ("auto", "exact", "approximate")


def nn_cosine_distance(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Min cosine distance of each (normalised) query row to the (normalised) bank rows, ``chunk`` queries at a
    time. Returns ``[len(queries)]``."""
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    out = torch.empty(queries.shape[0], dtype=torch.float32, device=queries.device)
    for s in range(0, queries.shape[0], chunk):
        sim = queries[s:s + chunk] @ bank.T
        out[s:s + chunk] = 1.0 - sim.max(dim=1).values
    return out


class NeighbourIndex(Protocol):
    """Nearest-neighbour search over a fixed bank of L2-normalised vectors."""

    def nearest(self, queries: np.ndarray) -> np.ndarray:
        """Cosine distance (1 - cos) of each L2-normalised query ``[n, d]`` to its nearest bank vector: ``[n]``."""


class ExactIndex:
    """Brute force on the device: the reference every approximate index is checked against."""

    def __init__(self, bank: np.ndarray | torch.Tensor, device: str = "cpu", chunk: int = 4096):
        self.bank = torch.as_tensor(np.asarray(bank, np.float32) if isinstance(bank, np.ndarray) else bank,
                                    device=device).float()
        self.chunk = chunk

    def nearest(self, queries: np.ndarray) -> np.ndarray:
        q = torch.as_tensor(np.asarray(queries, np.float32), device=self.bank.device)
        return nn_cosine_distance(q, self.bank, self.chunk).cpu().numpy()


IndexFactory = Callable[[np.ndarray, dict[str, Any]], NeighbourIndex]


class KNNDetector(Detector):
    name = "knn"
    summary = "AnomalyDINO-style few-shot kNN: cosine distance to the nearest normal patch of k shots"

    @dataclass(frozen=True)
    class Settings:
        shots: int = 4  # normal train images per target category in the bank
        layer: int = -1  # stored layer (-1: the deepest stored)
        index: str = "auto"  # auto | exact | approximate
        approximate_above: int = 50_000  # bank vectors above which "auto" uses the approximate index
        nprobes: int = 32  # partitions an approximate search probes (recall against speed)
        pooling: str = "top:1%"
        chunk: int = 4096

        def __post_init__(self) -> None:
            if self.shots < 1:
                raise DetectorConfigError(f"knn: shots={self.shots} must be >= 1")
            if self.index not in INDEX_MODES:
                raise DetectorConfigError(f"knn: index={self.index!r}, use one of {INDEX_MODES}")

    def __init__(self, settings: Any = None, index_factory: IndexFactory | None = None, device: str = "cpu",
                 **overrides: Any) -> None:
        super().__init__(settings, **overrides)
        self.index_factory = index_factory
        self.device = device
        self.index: NeighbourIndex | None = None
        self.approximate = False

    def inputs(self) -> Inputs:
        return Inputs(layers=(self.settings.layer,), shots=self.settings.shots)

    def fit(self, data: FitData) -> "KNNDetector":
        shots = data.need("shots", "knn")
        t = to_tensor(shots.layer()[:self.settings.shots], self.device)
        check_tokens(t, "normal tokens")
        bank = l2_normalize(t.reshape(-1, t.shape[-1]))
        s = self.settings
        self.approximate = s.index == "approximate" or (s.index == "auto" and bank.shape[0] > s.approximate_above)
        if self.approximate:
            if self.index_factory is None:
                raise DetectorConfigError("knn: an approximate index needs an index factory (spg detect gives it "
                                          "one backed by the store); use index=exact")
            self.index = self.index_factory(bank.cpu().numpy(), {"category": data.category,
                                                                  "image_ids": list(shots.image_ids[:s.shots])})
        else:
            self.index = ExactIndex(bank, self.device, s.chunk)
        return self

    @torch.no_grad()
    def score(self, batch: TokenSet | ArrayLike) -> np.ndarray:
        if self.index is None:
            raise RuntimeError("KNNDetector.score called before fit")
        t = to_tensor(batch.layer() if isinstance(batch, TokenSet) else batch, self.device)
        check_tokens(t)
        m, h, w, d = t.shape
        q = l2_normalize(t.reshape(-1, d)).cpu().numpy()
        return np.asarray(self.index.nearest(q), np.float32).reshape(m, h, w)


__all__ = ["ExactIndex", "IndexFactory", "KNNDetector", "NeighbourIndex", "nn_cosine_distance"]
