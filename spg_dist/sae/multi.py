"""The SAEs of one training pass as one ``nn.Module``: one forward, one summed loss, one thing for DDP to wrap."""

from __future__ import annotations

from typing import Iterator, Sequence

from torch import Tensor, nn

from spg_dist.sae.model import SAEOutput, TopKSAE


class MultiSAE(nn.Module):
    """The SAEs of one training pass as one module (what DDP wraps).

    ``forward(x, dead_masks, preprocessed=False) -> (total_loss, [SAEOutput])``: raw tokens in (the
    preprocessing is applied once when all SAEs share it, the usual case, else per SAE), or with
    ``preprocessed`` tokens the data loader already sent through the shared preprocessing (needed when a step
    such as per-image centring must see whole images, which a shuffled batch no longer is). Every parameter of
    every SAE takes part in every forward (DDP requires it; the sparse backward still returns dense, mostly-zero
    gradients).
    """

    def __init__(self, saes: Sequence[TopKSAE]) -> None:
        super().__init__()
        self.saes = nn.ModuleList(saes)

    def __len__(self) -> int:
        return len(self.saes)

    def __iter__(self) -> Iterator[TopKSAE]:
        return iter(self.saes)

    def __getitem__(self, i: int) -> TopKSAE:
        return self.saes[i]

    def forward(self, x: Tensor, dead_masks: Sequence[Tensor | None] | None = None,
                preprocessed: bool = False) -> tuple[Tensor, list[SAEOutput]]:
        saes: list[TopKSAE] = list(self.saes)
        masks = list(dead_masks) if dead_masks is not None else [None] * len(saes)
        if len(masks) != len(saes):
            raise ValueError(f"got {len(masks)} dead masks for {len(saes)} SAEs")
        shared = all(s.preprocessing == saes[0].preprocessing for s in saes)
        if preprocessed:
            if not shared:
                raise ValueError("preprocessed input needs SAEs that share one preprocessing")
            outs = [sae.forward_preprocessed(x, m) for sae, m in zip(saes, masks)]
        elif shared:
            xp = saes[0].preprocess(x)
            outs = [sae.forward_preprocessed(xp, m) for sae, m in zip(saes, masks)]
        else:
            outs = [sae(x, m) for sae, m in zip(saes, masks)]
        total = outs[0].total
        for out in outs[1:]:
            total = total + out.total
        return total, outs
