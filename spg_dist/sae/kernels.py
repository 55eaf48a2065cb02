"""Sparse autograd for the TopK SAE: a fused encoder whose backward touches only the selected latents, and an
embedding-bag decoder.

Why: a TopK SAE's forward needs one dense matmul (``[N, d] x [d, C]``, to rank the latents), but everything
after the selection is sparse. A dense autograd implementation pays three more ``N x d x C`` matmuls (decoder
forward, and two for the encoder backward through the dense ``[N, C]`` code) and keeps the ``[N, C]`` tensors
alive for backward. Here, following EleutherAI's *sparsify* design, the encoder is one ``autograd.Function``
that saves only the inputs and the ``[N, k]`` selection, and the decoder is an embedding bag, so after the
forward matmul every step costs ``O(N * k * d)``.

Backward of the fused encoder, with ``g [N, k]`` the gradient of the selected (post-ReLU) values, masked to
live entries (value > 0: ReLU's derivative, and padding slots of BatchTopK carry value 0):

* ``grad b_enc = index_add(indices, g)`` (scatter-add of k entries per token);
* ``grad x     = embedding_bag(indices, W_enc, per_sample_weights=g)`` (each token sums k encoder rows);
* ``grad W_enc = S^T x`` where ``S [N, C]`` is the sparse matrix holding ``g`` at ``indices``. We compute this
  *sparse-transpose* product as an embedding bag over the tokens: sort the ``N*k`` (token, latent) pairs by
  latent (one stable sort), then latent ``c``'s row is the ``g``-weighted sum of the tokens that selected it, one
  bag per latent. No ``[N, k, d]`` temporary (which sparsify materialises in chunks for ``index_add``), a
  deterministic summation order (sorted, no atomics), and measured ~8x faster than ``index_add`` on CPU.

The AuxK selection (top ``k_aux`` pre-activations among dead latents) is made inside the same forward from the
same dense pre-activations, so AuxK costs no second matmul; its gradient flows through the same sparse backward.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from spg_dist.sae.selection import Selection


def sparse_transpose_matmul(indices: Tensor, weights: Tensor, src: Tensor, num_rows: int) -> Tensor:
    """``S^T @ src`` for the sparse ``S [N, num_rows]`` with ``S[n, indices[n, j]] += weights[n, j]``.

    ``indices``/``weights``: ``[N, m]``; ``src``: ``[N, d]``; returns ``[num_rows, d]`` in ``src``'s dtype.
    Implemented as one embedding bag over ``src`` with one bag per output row (see the module docstring).
    Never syncs with the host (offsets come from ``searchsorted``, not ``bincount``).
    """
    n, m = indices.shape
    flat = indices.reshape(-1)
    sorted_rows, order = torch.sort(flat, stable=True)
    tokens = torch.div(order, m, rounding_mode="floor") if m != 1 else order
    offsets = torch.searchsorted(sorted_rows, torch.arange(num_rows, device=flat.device, dtype=sorted_rows.dtype))
    per_sample = weights.reshape(-1)[order].to(src.dtype)
    return F.embedding_bag(tokens, src, offsets, per_sample_weights=per_sample, mode="sum")


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """``sum_j values[n, j] * W_dec[indices[n, j]]`` for each token: ``[N, m]`` codes -> ``[N, d]``.

    An embedding bag (O(m * d) per token, never a dense ``[N, C] @ [C, d]``); its backward is sparse too
    (gradients reach only the ``m`` selected rows of ``W_dec`` and the ``m`` values of each token).
    """
    if indices.shape[-1] == 0:
        return W_dec.new_zeros(indices.shape[0], W_dec.shape[1]) + 0.0 * W_dec.sum()  # keeps W_dec in the graph
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


class FusedSparseEncode(torch.autograd.Function):
    """``(x_c, W_enc, b_enc) -> (values, indices, aux_values, aux_indices)``; see the module docstring.

    ``select`` maps the dense pre-activations ``[N, C]`` to a :data:`Selection` (selection.py). When
    ``dead_mask`` is given and ``k_aux > 0`` the top ``k_aux`` pre-activations among dead latents are also
    returned (ReLU'd, for AuxK); otherwise the aux outputs are empty ``[N, 0]``. Only ``x_c``, ``W_enc`` and the
    small ``[N, k + k_aux]`` selections are saved for backward; the ``[N, C]`` pre-activations are freed.
    """

    @staticmethod
    def forward(ctx, xc: Tensor, W_enc: Tensor, b_enc: Tensor, select: Callable[[Tensor], Selection],
                dead_mask: Tensor | None, k_aux: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pre = torch.addmm(b_enc, xc, W_enc.t())  # under CUDA autocast this runs (and returns) bf16
        pre_values, indices, valid = select(pre)
        values = pre_values.relu()
        if valid is not None:
            values = values.masked_fill(~valid, 0)
        if dead_mask is not None and k_aux > 0:
            aux_pre, aux_indices = pre.masked_fill(~dead_mask, float("-inf")).topk(k_aux, dim=-1, sorted=False)
            aux_values = aux_pre.relu()
        else:
            aux_values = pre.new_zeros(pre.shape[0], 0)
            aux_indices = indices.new_zeros(pre.shape[0], 0)
        ctx.save_for_backward(xc, W_enc, b_enc, values, indices, aux_values, aux_indices)
        ctx.mark_non_differentiable(indices, aux_indices)
        ctx.set_materialize_grads(False)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values: Tensor | None, _gi: None, grad_aux: Tensor | None, _gai: None):
        xc, W_enc, b_enc, values, indices, aux_values, aux_indices = ctx.saved_tensors
        idx_parts, grad_parts = [], []
        for grad, vals, idx in ((grad_values, values, indices), (grad_aux, aux_values, aux_indices)):
            if grad is not None and idx.shape[-1] > 0:
                idx_parts.append(idx)
                grad_parts.append(grad.to(W_enc.dtype) * (vals > 0))  # ReLU derivative; padding is 0 too
        if not idx_parts:
            return None, None, None, None, None, None
        idx = torch.cat(idx_parts, dim=1) if len(idx_parts) > 1 else idx_parts[0]
        g = torch.cat(grad_parts, dim=1) if len(grad_parts) > 1 else grad_parts[0]
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, W_enc, per_sample_weights=g, mode="sum").to(xc.dtype)
        if ctx.needs_input_grad[1]:
            grad_W = sparse_transpose_matmul(idx, g, xc.to(W_enc.dtype), W_enc.shape[0])
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros_like(b_enc).index_add_(0, idx.reshape(-1), g.reshape(-1).to(b_enc.dtype))
        return grad_x, grad_W, grad_b, None, None, None


def sparse_encode(xc: Tensor, W_enc: Tensor, b_enc: Tensor, select: Callable[[Tensor], Selection],
                  dead_mask: Tensor | None = None, k_aux: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Functional entry point of :class:`FusedSparseEncode` (autograd-aware)."""
    return FusedSparseEncode.apply(xc, W_enc, b_enc, select, dead_mask, k_aux)
