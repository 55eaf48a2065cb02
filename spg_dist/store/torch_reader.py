"""Stream stored patch tokens into PyTorch (a ``DataLoader``-ready ``IterableDataset``)."""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from spg_dist.store.connection import Store
from spg_dist.store.tokens import iter_tokens


class TokenDataset(IterableDataset):
    """Yields [n, d] blocks of tokens (one block per stored batch of images), sharded by DataLoader worker.

    Blocks rather than single tokens: a per-token Python yield would cost more than the training step.
    """

    def __init__(self, store: Store | str, backbone: str, layer: int, images_per_block: int = 64, **filters: Any):
        self.store = store if isinstance(store, Store) else Store(store)
        self.backbone, self.layer, self.images_per_block, self.filters = backbone, layer, images_per_block, filters

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        for i, (_, toks) in enumerate(iter_tokens(self.store, self.backbone, self.layer,
                                                  batch_size=self.images_per_block, **self.filters)):
            if info is None or i % info.num_workers == info.id:
                yield torch.from_numpy(toks.reshape(-1, toks.shape[-1]).copy())  # Arrow buffers are read-only
