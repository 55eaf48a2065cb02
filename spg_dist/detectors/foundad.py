"""FoundAD (few-shot, category-agnostic): a "manifold projector" learns to map the frozen tokens of corrupted
normal images back to the tokens of the clean image; at test time a patch's anomaly score is how far the projector
moves it, ``‖f − φ(f)‖² / d`` on the raw tokens, and an image's score is the mean of its top-K patch scores
(K = 10 for MVTec-like, 6 for VisA-like data: ``pooling="top:10"``).

The projector is the reference's ViT predictor: ``Linear(d → width)`` (no positional embedding), ``depth`` pre-norm
blocks (``x + attn(LN(x))``, ``x + mlp(LN(x))``; ``heads`` heads, MLP ratio 4, GELU, qkv bias, LN eps 1e-6) with the
input embedding added back after every block (``x = blk(x) + residual``), ``LayerNorm(width)``, ``Linear(width → d)``.
Linear weights truncated-normal (std 0.02), zero biases; dropout on the input features while training.

Training (:func:`train_projector`): target = the clean tokens; per batch, with probability ``identity_prob`` the
input is the clean tokens themselves (an identity pair: normal tokens must stay put), otherwise the tokens of the
CutPaste copies (``spg_dist.data.corruptions``); loss = MSE over all patches and channels; AdamW at a constant lr.
One projector for the shots of every category (``scope="dataset"``). ``FoundADDetector.trainer_fn`` swaps in
another trainer with the same arguments (``spg_dist.ray.foundad_train.ray_trainer``: DDP on Ray Train).
Pure PyTorch: no store, no Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spg_dist.detectors.base import (ArrayLike, Detector, DetectorConfigError, FitData, Inputs, TokenSet,
                                     check_tokens, to_tensor)
from spg_dist.evaluation.pooling import parse_pooling

OnStep = Callable[[int, float], None]


# ------------------------------------------------------------------------------------------------- the projector
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))`` then ``x + mlp(LN(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ManifoldProjector(nn.Module):
    """FoundAD's projector φ: tokens ``[B, h, w, d]`` (or ``[B, n, d]``) -> tokens of the same shape."""

    def __init__(self, d: int, width: int = 384, depth: int = 6, heads: int = 12, mlp_ratio: float = 4.0,
                 input_dropout: float = 0.2, eps: float = 1e-6) -> None:
        super().__init__()
        if min(d, width, depth, heads) < 1 or width % heads or mlp_ratio <= 0 or not 0 <= input_dropout < 1:
            raise ValueError(f"ManifoldProjector(d={d}, width={width}, depth={depth}, heads={heads}, "
                             f"mlp_ratio={mlp_ratio}, input_dropout={input_dropout}): invalid architecture")
        self.d, self.width, self.depth, self.heads, self.mlp_ratio = d, width, depth, heads, mlp_ratio
        self.input_dropout = nn.Dropout(input_dropout)
        self.predictor_embed = nn.Linear(d, width)
        self.predictor_blocks = nn.ModuleList(Block(width, heads, mlp_ratio, True, eps) for _ in range(depth))
        self.predictor_norm = nn.LayerNorm(width, eps=eps)
        self.predictor_proj = nn.Linear(width, d)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def arch(self) -> dict[str, Any]:
        """What rebuilds this module (with its state_dict)."""
        return {"d": self.d, "width": self.width, "depth": self.depth, "heads": self.heads,
                "mlp_ratio": self.mlp_ratio}

    def forward(self, tokens: Tensor) -> Tensor:
        shape = tokens.shape
        if tokens.ndim not in (3, 4) or shape[-1] != self.d:
            raise ValueError(f"ManifoldProjector(d={self.d}) needs [B, h, w, d] or [B, n, d], got {tuple(shape)}")
        x = self.predictor_embed(self.input_dropout(tokens.reshape(shape[0], -1, self.d)))
        residual = x.clone()
        for blk in self.predictor_blocks:
            x = blk(x) + residual
        return self.predictor_proj(self.predictor_norm(x)).reshape(shape)


def build_projector(d: int, settings: Any) -> ManifoldProjector:
    """A fresh projector for ``d``-dimensional tokens with the architecture in ``settings``."""
    return ManifoldProjector(d, settings.width, settings.depth, settings.heads, settings.mlp_ratio,
                             settings.input_dropout)


@torch.no_grad()
def projection_error(projector: ManifoldProjector, tokens: Tensor, chunk: int = 16,
                     target: Tensor | None = None) -> Tensor:
    """``‖target − φ(tokens)‖² / d`` per patch, ``[N, h, w]`` (``target`` defaults to ``tokens``: the anomaly
    score), in eval mode, ``chunk`` images at a time."""
    was_training = projector.training
    projector.eval()
    target = tokens if target is None else target
    out = []
    for s in range(0, tokens.shape[0], chunk):
        out.append((projector(tokens[s:s + chunk]) - target[s:s + chunk]).pow(2).mean(-1))
    projector.train(was_training)
    return torch.cat(out) if out else tokens.new_zeros(tokens.shape[:-1])


# ------------------------------------------------------------------------------------------------- training
def identity_coin(seed: int, step: int, prob: float) -> bool:
    """Whether batch ``step`` is an identity pair: a function of (seed, step) only, so every DDP rank agrees."""
    return bool(np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step), 0x1D]).random() < prob)


def batch_indices(n: int, batch: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless batches of ``min(batch, n)`` row indices: shuffled epochs over ``n`` rows, no row twice in a batch
    unless ``n < batch``."""
    batch = max(1, min(batch, n))
    order = torch.empty(0, dtype=torch.long)
    while True:
        while order.numel() < batch:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch]
        order = order[batch:]


def check_pairs(clean: Tensor, corrupted: Tensor) -> None:
    check_tokens(clean, "clean tokens")
    check_tokens(corrupted, "corrupted tokens")
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} tokens must be paired "
                         f"row by row (the same shape)")


def train_projector(clean: ArrayLike, corrupted: ArrayLike, settings: Any, device: str | torch.device = "cpu",
                    on_step: OnStep | None = None,
                    generator: torch.Generator | None = None) -> tuple[ManifoldProjector, list[dict[str, Any]]]:
    """Train a projector on row-paired tokens ``clean`` / ``corrupted`` ``[N, h, w, d]`` (rows may repeat clean
    images: one row per corrupted copy). Returns ``(projector in eval mode, curve)``; the curve has one
    ``{"step", "loss", "identity"}`` per step. Seeded by ``settings.seed`` (``generator`` for the batch order, else
    one seeded from it); dropout draws from a forked global RNG, so the caller's RNG state is left alone.
    Deterministic on CPU."""
    device = torch.device(device)
    clean_t, corr_t = to_tensor(clean, device), to_tensor(corrupted, device)
    check_pairs(clean_t, corr_t)
    s = settings
    gen = generator if generator is not None else torch.Generator().manual_seed(int(s.seed))
    fork = [device.index or 0] if device.type == "cuda" else []
    curve: list[dict[str, Any]] = []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(int(s.seed))
        projector = build_projector(clean_t.shape[-1], s).to(device)
        opt = torch.optim.AdamW(projector.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        projector.train()
        batches = batch_indices(clean_t.shape[0], s.batch_images, gen)
        for step in range(int(s.steps)):
            idx = next(batches).to(device)
            identity = identity_coin(s.seed, step, s.identity_prob)
            target = clean_t[idx]
            x = target if identity else corr_t[idx]
            loss = F.mse_loss(projector(x), target)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"foundad: non-finite loss {loss.item()} at step {step}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            curve.append({"step": step + 1, "loss": value, "identity": identity})
            if on_step is not None:
                on_step(step + 1, value)
    projector.eval()
    return projector, curve


# ------------------------------------------------------------------------------------------------- the detector
class FoundADDetector(Detector):
    name = "foundad"
    summary = ("FoundAD: a projector trained to map CutPaste-corrupted shot tokens to clean ones; score = "
               "|f - phi(f)|^2 per patch, top-K mean per image")
    trainable = True

    @dataclass(frozen=True)
    class Settings:
        shots: int = 4  # normal train images per category (all categories train one projector)
        layer: int = -1
        depth: int = 6
        width: int = 384
        heads: int = 12
        mlp_ratio: float = 4.0
        input_dropout: float = 0.2
        lr: float = 1e-3
        weight_decay: float = 1e-4
        batch_images: int = 8
        steps: int = 2000
        identity_prob: float = 0.5
        seed: int = 0
        pooling: str = "top:10"  # 10 for MVTec-like data, 6 for VisA-like

        def __post_init__(self) -> None:
            def bad(what: str) -> DetectorConfigError:
                return DetectorConfigError(f"foundad: {what}")
            for key in ("shots", "depth", "width", "heads", "batch_images"):
                if getattr(self, key) < 1:
                    raise bad(f"{key}={getattr(self, key)} must be >= 1")
            if self.width % self.heads:
                raise bad(f"heads={self.heads} must divide width={self.width}")
            if self.steps < 0:
                raise bad(f"steps={self.steps} must be >= 0")
            if not (self.mlp_ratio > 0 and math.isfinite(self.mlp_ratio)):
                raise bad(f"mlp_ratio={self.mlp_ratio} must be > 0")
            if not 0 <= self.input_dropout < 1:
                raise bad(f"input_dropout={self.input_dropout} must be in [0, 1)")
            if not (self.lr > 0 and math.isfinite(self.lr)):
                raise bad(f"lr={self.lr} must be > 0")
            if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
                raise bad(f"weight_decay={self.weight_decay} must be >= 0")
            if not 0 <= self.identity_prob <= 1:
                raise bad(f"identity_prob={self.identity_prob} must be in [0, 1]")
            try:
                parse_pooling(self.pooling)
            except ValueError as e:
                raise bad(str(e)) from None

    def __init__(self, settings: Any = None, device: str = "cpu", **overrides: Any) -> None:
        super().__init__(settings, **overrides)
        self.device = device
        self.projector: ManifoldProjector | None = None
        self.curve: list[dict[str, Any]] = []
        # called instead of train_projector: (clean, corrupted, settings, device=...) -> (projector, curve), e.g.
        # spg_dist.ray.foundad_train.ray_trainer(workers=2)
        self.trainer_fn: Callable[..., tuple[ManifoldProjector, list[dict[str, Any]]]] | None = None

    def inputs(self) -> Inputs:
        s = self.settings
        return Inputs(layers=(s.layer,), shots=s.shots, corruptions=True, scope="dataset")

    @staticmethod
    def pairs(corrupted: TokenSet) -> tuple[np.ndarray, np.ndarray]:
        """(clean tokens, corrupted tokens) paired row by row: clean row ``i`` is the clean shot named by
        ``corrupted.source_ids[i]``, of the same layer as the corrupted tokens."""
        clean = corrupted.clean
        if clean is None or corrupted.source_ids is None or len(corrupted.source_ids) != len(corrupted):
            raise DetectorConfigError("foundad: corrupted tokens need their clean shots (.clean) and one source id "
                                      "per corrupted image (.source_ids)")
        layer = corrupted.layers[-1]
        if layer not in clean.tokens:
            raise DetectorConfigError(f"foundad: corrupted tokens are of layer {layer}, the clean shots hold layers "
                                      f"{clean.layers}")
        row = {image_id: i for i, image_id in enumerate(clean.image_ids)}
        missing = sorted({s for s in corrupted.source_ids if s not in row})
        if missing:
            raise DetectorConfigError(f"foundad: {len(missing)} corrupted image(s) made from images that are not "
                                      f"among the clean shots, e.g. {missing[0]!r}")
        idx = np.asarray([row[s] for s in corrupted.source_ids], dtype=np.int64)
        clean_t, corr_t = clean.tokens[layer][idx], corrupted.tokens[layer]
        if clean_t.shape != corr_t.shape:
            raise DetectorConfigError(f"foundad: clean tokens {clean_t.shape[1:]} and corrupted tokens "
                                      f"{corr_t.shape[1:]} differ in grid or dimension")
        return clean_t, corr_t

    def fit(self, data: FitData) -> "FoundADDetector":
        clean, corrupted = self.pairs(data.need("corrupted", "foundad"))
        train = self.trainer_fn or train_projector
        projector, curve = train(to_tensor(clean), to_tensor(corrupted), self.settings, device=self.device)
        self.projector = projector.to(self.device).eval()
        self.curve = list(curve)
        return self

    @torch.no_grad()
    def score(self, batch: TokenSet | ArrayLike) -> np.ndarray:
        if self.projector is None:
            raise RuntimeError("FoundADDetector.score called before fit (or load_state_dict)")
        t = to_tensor(batch.layer() if isinstance(batch, TokenSet) else batch, self.device)
        check_tokens(t)
        if t.shape[-1] != self.projector.d:
            raise ValueError(f"foundad: tokens of dimension {t.shape[-1]}, the projector was trained on "
                             f"{self.projector.d}")
        return projection_error(self.projector, t).float().cpu().numpy()

    # learned state
    _ARCH = ("d", "width", "depth", "heads")

    def state_dict(self) -> dict[str, Tensor]:
        if self.projector is None:
            return {}
        out = {f"projector.{k}": v.detach().cpu().clone() for k, v in self.projector.state_dict().items()}
        out.update({f"arch.{k}": torch.tensor(getattr(self.projector, k), dtype=torch.int64) for k in self._ARCH})
        out["arch.mlp_ratio"] = torch.tensor(float(self.projector.mlp_ratio), dtype=torch.float64)
        return out

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        missing = [f"arch.{k}" for k in (*self._ARCH, "mlp_ratio") if f"arch.{k}" not in state]
        if missing:
            raise DetectorConfigError(f"foundad: state without {', '.join(missing)} (not a foundad state_dict)")
        arch = {k: int(state[f"arch.{k}"]) for k in self._ARCH}
        mlp_ratio = float(state["arch.mlp_ratio"])
        s = self.settings
        differ = [f"{k}={arch[k]} (settings: {getattr(s, k)})" for k in self._ARCH[1:] if arch[k] != getattr(s, k)]
        if not math.isclose(mlp_ratio, s.mlp_ratio):
            differ.append(f"mlp_ratio={mlp_ratio} (settings: {s.mlp_ratio})")
        if differ:
            raise DetectorConfigError(f"foundad: stored projector has {', '.join(differ)}; load it with the settings "
                                      f"it was trained with")
        projector = build_projector(arch["d"], s)
        weights = {k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")}
        try:
            projector.load_state_dict(weights, strict=True)
        except RuntimeError as e:
            raise DetectorConfigError(f"foundad: stored projector does not match its architecture: "
                                      f"{str(e).splitlines()[0]}") from None
        self.projector = projector.to(self.device).eval()


__all__ = ["Block", "FoundADDetector", "ManifoldProjector", "batch_indices", "build_projector", "check_pairs",
           "identity_coin", "projection_error", "train_projector"]
