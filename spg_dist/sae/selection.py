"""Sparsifiers: which latents of the dense pre-activations ``pre [N, C]`` become active.

Every selector returns ``(pre_values [N, m], indices [N, m], valid [N, m] bool | None)``: the pre-activations
at the chosen latents, their indices, and (for variable-size selections) which of the ``m`` slots are real.
Padding slots (``valid == False``) point at some latent but carry value 0 after masking, so the embedding-bag
decoder adds nothing for them and the sparse backward sends them no gradient. ReLU is applied afterwards by the
encoder, identically for all selectors (a selected latent with a negative pre-activation outputs 0).

Selectors are pure functions of ``pre`` so the fused sparse encoder (kernels.py) and the dense reference
(TopKSAE.encode_dense) share them and cannot disagree.
"""

from __future__ import annotations

import torch
from torch import Tensor

Selection = tuple[Tensor, Tensor, "Tensor | None"]


def select_topk(pre: Tensor, k: int) -> Selection:
    """Per token, the ``k`` largest pre-activations (TopK of Gao et al. 2024). Always exactly k slots."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return values, indices, None


def _pad_rows(pre: Tensor, keep: Tensor) -> Selection:
    """Pack a boolean selection ``keep [N, C]`` into padded ``[N, kmax]`` slots (kmax = max kept per row, >= 1).

    One host sync for kmax: the padded width is a shape, so it must be known on the host.
    """
    kmax = int(keep.sum(dim=-1).max().clamp(min=1, max=pre.shape[-1]))
    _, indices = pre.masked_fill(~keep, float("-inf")).topk(kmax, dim=-1, sorted=False)
    valid = keep.gather(-1, indices)
    return pre.gather(-1, indices), indices, valid


def select_batchtopk(pre: Tensor, k: int) -> Selection:
    """BatchTopK (Bussmann et al. 2024), training mode: keep the ``N * k`` largest pre-activations of the whole
    batch, so tokens share a budget of k latents on average (exactly ``N * k`` slots are valid, ties broken by
    ``topk``). Returned padded to the largest per-token count."""
    n, c = pre.shape
    total = min(n * k, n * c)
    _, flat = pre.reshape(-1).topk(total, sorted=False)
    keep = torch.zeros(n * c, dtype=torch.bool, device=pre.device)
    keep[flat] = True
    return _pad_rows(pre, keep.view(n, c))


def select_threshold(pre: Tensor, threshold: float | Tensor) -> Selection:
    """BatchTopK at inference: every latent whose pre-activation exceeds the learned threshold, per token
    independently (so a token's code does not depend on the rest of its batch). Padded like BatchTopK."""
    return _pad_rows(pre, pre > threshold)
