"""VisualAD (github 7HHHHH/VisualAD): two learnable tokens inside a frozen ViT, trained on a labelled auxiliary
dataset and applied zero-shot.

The method, as read from the reference code:

- Two learnable tokens ``t_a`` (anomaly) and ``t_n`` (normal), initialised ``width**-0.5 * randn(width) * 0.1``,
  enter the frozen ViT's sequence in front of the class token, both with the class token's (frozen) position
  embedding, pass through every frozen block and are read out after the last block through the final norm
  (open_clip ``ln_post``, the transformers models' final layernorm). That final norm is trainable (a copy of the
  backbone's: the backbone itself stays untouched).
- At ``K`` evenly spaced layers (ViT-L: 6, 12, 18, 24; ``round(L * i / 4)``, deduplicated) the block's patch
  tokens ``p_l`` (through the final norm, prefix tokens dropped) go through a per-layer alignment MLP
  (``Linear -> GELU -> Dropout(0.1) -> Linear -> Dropout(0.1)``), and a per-layer spatial-aware cross-attention
  (:class:`SpatialCrossAttention`: learnable anchor queries over the patches, gated by the token) turns the
  last-layer tokens into ``t_a^l``, ``t_n^l``. The per-layer map is ``cos(p̂_l, t_a^l) - cos(p̂_l, t_n^l)``; maps
  are summed over layers, upsampled bilinearly, smoothed with a Gaussian (sigma 4 at 518 px, scaled with the
  resolution) and the image score is the mean of the top 1 % pixels.
- Loss: BCE-with-logits of the top-1 % mean of the summed (unsmoothed, upsampled) map against the image label,
  plus per layer focal + dice of ``sigmoid(s_l)`` against the mask, plus the margin term
  ``mean(max(0, cos(t̂_a, t̂_n) + 0.5))`` on the last layer's enhanced tokens (keeps them more than 120 degrees
  apart). AdamW (weight decay 0.01), tokens at ``lr_tokens``, every other trained tensor at ``lr_modules``,
  cosine annealing per epoch down to 0.1 x (as the reference), gradient-norm clip 1.0 on each token.

Deliberate deviations from the reference (recorded in :meth:`VisualADDetector.params`):

1. ``isolate=True`` (default): one-way attention. The learnable tokens attend to the whole sequence, but the
   original tokens (class, registers, patches) never attend to the learnable ones, so the backbone's patch tokens
   are exactly its own: the frozen model runs unchanged and the two tokens' path is computed block by block from
   the block's own submodules (norms, q/k/v and output projections, MLP, layer scales; DINOv3's rotary embedding
   on the patch keys exactly as the model applies it). ``isolate=False`` is the reference's joint attention (the
   patches see the tokens, so the patch tokens drift away from the backbone's).
2. ``residual_align=True`` (default): the alignment MLP is residual with a zero-initialised last Linear,
   ``p̂ = p + MLP(p)``, so at initialisation ``p̂ = p``. ``False`` is the reference's plain MLP.

Also worth knowing: the reference learns the two tokens' position embeddings (initialised from the class
token's); here they are the class token's, frozen. Backbones without an absolute class-token position (DINOv3:
RoPE on the patches only; SigLIP: no class token at all) give the tokens no position, like DINOv3's own class
token. This detector reads pixels and runs its own ViT: it never reads the stored tokens.

Supported backbone families: open_clip ViTs (``openclip``, plain residual blocks), DINOv2 (``dinov2``,
``dinov2_registers``), DINOv3 (``dinov3``) and SigLIP (``siglip``). Pure PyTorch/NumPy: no store, no Ray.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spg_dist.detectors.base import ArrayLike, Detector, DetectorConfigError, FitData, Inputs, TokenSet
from spg_dist.evaluation.pooling import parse_pooling
from spg_dist.guides.losses import dice, focal

SUPPORTED_FAMILIES = ("openclip", "dinov2", "dinov2_registers", "dinov3", "siglip")
REFERENCE_SIZE = 518  # the resolution smooth_sigma is given at
TOP_FRACTION = 0.01  # the image score inside the loss: mean of the top 1 % pixels of the summed map
DROPOUT = 0.1


# ------------------------------------------------------------------------------------------ the frozen ViT, opened
@dataclass
class _BlockOps:
    """The parts of one pre-norm transformer block the isolated token path needs."""

    norm1: Callable[[torch.Tensor], torch.Tensor]
    qkv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    out: Callable[[torch.Tensor], torch.Tensor]
    ls1: Callable[[torch.Tensor], torch.Tensor]
    norm2: Callable[[torch.Tensor], torch.Tensor]
    mlp: Callable[[torch.Tensor], torch.Tensor]
    ls2: Callable[[torch.Tensor], torch.Tensor]
    heads: int
    scale: float


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class TokenViT:
    """A frozen backbone of a supported family opened up block by block (references its modules, copies nothing).

    ``embed`` gives the sequence entering block 1 (and the rotary tables of DINOv3), ``token_init`` places extra
    tokens the way the class token is placed, ``run_block`` is the block's own forward, ``token_block`` the
    isolated path of extra tokens through one block, and :meth:`forward` runs it all.
    """

    def __init__(self, backbone: Any) -> None:
        cfg = backbone.config
        self.backbone = backbone
        self.family = cfg.family
        self.num_prefix = int(cfg.num_prefix_tokens)
        self.patch_size = int(cfg.patch_size)
        self.dim = int(cfg.dim)
        if self.family == "openclip":
            from open_clip.transformer import ResidualAttentionBlock

            visual = backbone.visual
            self.blocks = list(visual.transformer.resblocks)
            bad = [type(b).__name__ for b in self.blocks if type(b) is not ResidualAttentionBlock]
            if bad or not getattr(visual.transformer, "batch_first", True) or visual.attn_pool is not None:
                what = bad[0] if bad else "an attentional pool"
                raise DetectorConfigError(f"visualad: the open_clip tower of {cfg.name} uses {what}; only plain "
                                          "ResidualAttentionBlock ViTs are supported")
            self.final_norm = visual.ln_post
        elif self.family in ("dinov2", "dinov2_registers"):
            self.blocks = list(backbone.model.encoder.layer)
            self.final_norm = backbone.model.layernorm
        elif self.family == "dinov3":
            self.blocks = list(backbone.model.model.layer)
            self.final_norm = backbone.model.norm
        elif self.family == "siglip":
            self.blocks = list(backbone.model.encoder.layers)
            self.final_norm = backbone.model.post_layernorm
        else:
            raise DetectorConfigError(f"visualad: backbone {cfg.name} is of family {self.family!r}; supported "
                                      f"families: {', '.join(SUPPORTED_FAMILIES)}")
        self.num_layers = len(self.blocks)

    # the original sequence
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Normalised pixels [B, 3, H, W] -> (sequence entering block 1 [B, S, C], context: DINOv3's (cos, sin))."""
        if self.family == "openclip":
            return self.backbone.visual._embeds(x), None
        model = self.backbone.model
        if self.family == "siglip":
            return model.embeddings(x, interpolate_pos_encoding=bool(self.backbone._forward_kwargs)), None
        if self.family == "dinov3":
            x = x.to(model.embeddings.patch_embeddings.weight.dtype)
            return model.embeddings(x), model.rope_embeddings(x)
        return model.embeddings(x), None

    def token_init(self, tokens: torch.Tensor) -> torch.Tensor:
        """Extra tokens [T, C] as they enter block 1: with the class token's position embedding (open_clip also
        its ``ln_pre``); DINOv3 and SigLIP have no absolute class position, so there they enter as they are."""
        if self.family == "openclip":
            visual = self.backbone.visual
            return visual.ln_pre(tokens + visual.positional_embedding[0].to(tokens.dtype))
        if self.family in ("dinov2", "dinov2_registers"):
            return tokens + self.backbone.model.embeddings.position_embeddings[0, 0].to(tokens.dtype)
        return tokens

    def run_block(self, i: int, h: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Block ``i`` (0-based) on the sequence ``h``, exactly as the model runs it."""
        block = self.blocks[i]
        if self.family == "dinov3":
            return block(h, position_embeddings=ctx)
        if self.family == "siglip":
            return block(h, attention_mask=None)
        return block(h)

    def ops(self, i: int) -> _BlockOps:
        block = self.blocks[i]
        if self.family == "openclip":
            attn = block.attn

            def qkv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                return F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)

            return _BlockOps(block.ln_1, qkv, attn.out_proj, block.ls_1, block.ln_2, block.mlp, block.ls_2,
                             attn.num_heads, (self.dim // attn.num_heads) ** -0.5)
        if self.family == "siglip":
            attn = block.self_attn
            return _BlockOps(block.layer_norm1, lambda x: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)),
                             attn.out_proj, _identity, block.layer_norm2, block.mlp, _identity, attn.num_heads,
                             attn.scale)
        attn = block.attention
        heads = attn.num_heads if self.family == "dinov3" else attn.num_attention_heads
        return _BlockOps(block.norm1, lambda x: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)), attn.o_proj,
                         block.layer_scale1, block.norm2, block.mlp, block.layer_scale2, heads, attn.scaling)

    def token_block(self, i: int, z: torch.Tensor, h: torch.Tensor, ctx: Any) -> torch.Tensor:
        """One-way attention through block ``i``: the extra tokens ``z`` [B, T, C] attend to ``[z, h]`` (``h``: the
        block's input sequence, which never sees ``z``); norms, projections, MLP and layer scales are the block's."""
        ops = self.ops(i)
        b, t, c = z.shape
        heads = ops.heads
        hd = c // heads
        q, kz, vz = ops.qkv(ops.norm1(z))
        _, kh, vh = ops.qkv(ops.norm1(h))

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, x.shape[1], heads, hd).transpose(1, 2)

        q, kz, vz, kh, vh = map(split, (q, kz, vz, kh, vh))
        if self.family == "dinov3":  # RoPE on the patch keys only, as DINOv3 applies it (prefix tokens unrotated)
            cos, sin = ctx
            n = sin.shape[-2]
            rot = kh[..., -n:, :] * cos + _rotate_half(kh[..., -n:, :]) * sin
            kh = torch.cat([kh[..., :-n, :], rot], dim=-2)
        k = torch.cat([kz, kh], dim=2)
        v = torch.cat([vz, vh], dim=2)
        weights = torch.softmax((q @ k.transpose(-1, -2)) * ops.scale, dim=-1)
        a = (weights @ v).transpose(1, 2).reshape(b, t, c)
        z = z + ops.ls1(ops.out(a))
        return z + ops.ls2(ops.mlp(ops.norm2(z)))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, isolate: bool = True,
                keep: Sequence[int] = ()) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Normalised pixels and extra tokens [T, C] -> ({block l (1-based) in ``keep``: output of block l for the
        original sequence [B, S, C] (prefix + patches, before the final norm)}, the extra tokens after the last
        block [B, T, C], before the final norm). ``isolate``: one-way attention (the original sequence is the
        backbone's own, computed without gradient); else joint attention over ``[tokens, original]``."""
        keep = set(keep)
        b, t = x.shape[0], tokens.shape[0]
        z = self.token_init(tokens).unsqueeze(0).expand(b, -1, -1)
        out: dict[int, torch.Tensor] = {}
        if isolate:
            with torch.no_grad():
                h, ctx = self.embed(x)
            for i in range(self.num_layers):
                z = self.token_block(i, z, h, ctx)
                with torch.no_grad():
                    h = self.run_block(i, h, ctx)
                if i + 1 in keep:
                    out[i + 1] = h
            return out, z
        h, ctx = self.embed(x)
        s = torch.cat([z.to(h.dtype), h], dim=1)
        for i in range(self.num_layers):
            s = self.run_block(i, s, ctx)
            if i + 1 in keep:
                out[i + 1] = s[:, t:]
        return out, s[:, :t]


def _as_pixels(backbone: Any, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] (normalised here) or already-normalised float [B, 3, H, W]."""
    if isinstance(pixels, np.ndarray):
        pixels = torch.from_numpy(np.ascontiguousarray(pixels))
    if pixels.dtype == torch.uint8:
        return backbone.normalise(pixels)
    return pixels.to(backbone.device)


def insert_tokens_forward(backbone: Any, pixels: torch.Tensor | np.ndarray, tokens: torch.Tensor,
                          layers: Sequence[int] | None = None, isolate: bool = True,
                          norm: nn.Module | None = None) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Run ``backbone`` (a :class:`~spg_dist.backbones.Backbone` of a supported family) with extra tokens
    ``tokens`` [T, C] inserted in front of the class token.

    ``pixels``: uint8 [B, H, W, 3] or normalised float [B, 3, H, W]; ``layers``: blocks (1-based, negative from
    the end; None: the last); ``isolate``: one-way attention (the patches never see the tokens) or the joint
    attention of the reference; ``norm``: the final norm to read out through (default: the backbone's own).
    Returns ({layer: patch tokens of that block after the final norm, prefix dropped, [B, N, C]}, the extra tokens
    after the last block and the final norm [B, T, C]).
    """
    vit = TokenViT(backbone)
    resolved = backbone.resolve_layers(layers)
    norm = vit.final_norm if norm is None else norm
    states, z = vit.forward(_as_pixels(backbone, pixels), tokens.to(backbone.device), isolate, resolved)
    return {l: norm(states[l][:, vit.num_prefix:]) for l in resolved}, norm(z)


# ------------------------------------------------------------------------------------------ the learned parts
class AlignMLP(nn.Module):
    """Per-layer patch alignment: ``Linear -> GELU -> Dropout -> Linear -> Dropout``; residual with a
    zero-initialised last Linear (``p̂ = p + MLP(p)``, identity at init) unless ``residual=False``."""

    def __init__(self, dim: int, residual: bool = True, dropout: float = DROPOUT) -> None:
        super().__init__()
        self.residual = residual
        self.fc1 = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(dim, dim)
        self.drop2 = nn.Dropout(dropout)
        if residual:
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        y = self.drop2(self.fc2(self.drop1(self.act(self.fc1(p)))))
        return p + y if self.residual else y


class SpatialCrossAttention(nn.Module):
    """Spatial-aware cross-attention (SCA) of one layer: anchor queries ``A`` attend to the patches,
    ``Q = LN(W_q A)``, ``K = LN(W_k(p + E[:N]))``, ``V = W_v p``, ``agg = softmax(Q K^T / sqrt(C)) V``; the token
    gates the anchors, ``g = sigmoid(W_g t + b_g)``; ``t' = t + alpha * (W_o sum_j g_j agg_j + b_o)``. Dropout 0.1
    on the attention and the output, as the reference."""

    def __init__(self, dim: int, anchors: int, max_patches: int, alpha: float = 0.01,
                 dropout: float = DROPOUT) -> None:
        super().__init__()
        self.anchors = nn.Parameter(torch.randn(anchors, dim) * 0.02)
        self.spatial = nn.Parameter(torch.randn(max_patches, dim) * 0.02)
        self.w_q = nn.Linear(dim, dim, bias=False)
        self.w_k = nn.Linear(dim, dim, bias=False)
        self.w_v = nn.Linear(dim, dim, bias=False)
        self.norm_q = nn.LayerNorm(dim)
        self.norm_k = nn.LayerNorm(dim)
        self.gate = nn.Linear(dim, anchors)
        self.w_o = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        for lin in (self.w_q, self.w_k, self.w_v, self.w_o):
            nn.init.xavier_uniform_(lin.weight)
        nn.init.zeros_(self.w_o.bias)

    def forward(self, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """``t`` [B, T, C] tokens, ``p`` [B, N, C] patches -> enhanced tokens [B, T, C]."""
        n, c = p.shape[1], p.shape[2]
        if n > self.spatial.shape[0]:
            raise ValueError(f"SCA: {n} patches, but spatial embeddings for {self.spatial.shape[0]}")
        q = self.norm_q(self.w_q(self.anchors))  # [A, C]
        k = self.norm_k(self.w_k(p + self.spatial[:n]))  # [B, N, C]
        v = self.w_v(p)
        attn = self.drop(torch.softmax(torch.einsum("ac,bnc->ban", q, k) / math.sqrt(c), dim=-1))  # [B, A, N]
        agg = attn @ v  # [B, A, C]
        g = torch.sigmoid(self.gate(t))  # [B, T, A]
        return t + self.alpha * self.drop(self.w_o(g @ agg))


class VisualADHead(nn.Module):
    """Everything VisualAD learns: the two tokens, the final norm (a trainable copy), per-layer MLPs and SCAs."""

    def __init__(self, dim: int, final_norm: nn.Module, n_layers: int, anchors: int, max_patches: int,
                 residual_align: bool) -> None:
        super().__init__()
        scale = dim ** -0.5
        self.t_a = nn.Parameter(scale * torch.randn(dim) * 0.1)
        self.t_n = nn.Parameter(scale * torch.randn(dim) * 0.1)
        self.norm = copy.deepcopy(final_norm).float().requires_grad_(True)
        self.align = nn.ModuleList(AlignMLP(dim, residual_align) for _ in range(n_layers))
        self.sca = nn.ModuleList(SpatialCrossAttention(dim, anchors, max_patches) for _ in range(n_layers))

    def tokens(self) -> torch.Tensor:
        return torch.stack([self.t_a, self.t_n])


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (F.normalize(a, dim=-1, eps=1e-8) * F.normalize(b, dim=-1, eps=1e-8)).sum(-1)


def margin_loss(t_a: torch.Tensor, t_n: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """``mean(max(0, cos(t_a, t_n) + margin))`` over the batch: zero once the tokens are more than
    ``arccos(-margin)`` apart (120 degrees for 0.5)."""
    return F.relu(cosine(t_a, t_n) + margin).mean()


def upsample(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """[..., h, w] -> [..., H, W], bilinear (align_corners=False)."""
    lead = maps.shape[:-2]
    out = F.interpolate(maps.reshape(-1, 1, *maps.shape[-2:]), size=size, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *out.shape[-2:])


def visualad_loss(layer_maps: torch.Tensor, t_last: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                  margin: float = 0.5) -> tuple[torch.Tensor, dict[str, float]]:
    """The reference loss. ``layer_maps`` [K, B, g, g] (per layer, unsmoothed), ``t_last`` [B, 2, C] (the last
    layer's enhanced tokens), ``masks`` [B, H, W] in {0, 1}, ``labels`` [B] in {0, 1}."""
    up = upsample(layer_maps, tuple(masks.shape[-2:]))  # [K, B, H, W]
    total = up.sum(0).flatten(1)
    k = max(1, math.ceil(TOP_FRACTION * total.shape[1] - 1e-9))
    image = F.binary_cross_entropy_with_logits(total.topk(k, dim=1).values.mean(1), labels.float())
    probs = torch.sigmoid(up)
    seg = sum(focal(probs[i], masks) + dice(probs[i], masks) for i in range(up.shape[0]))
    marg = margin_loss(t_last[:, 0], t_last[:, 1], margin)
    loss = image + seg + marg
    return loss, {"loss": float(loss.detach()), "image": float(image.detach()), "seg": float(seg.detach()),
                  "margin": float(marg.detach())}


def default_layers(num_layers: int) -> list[int]:
    """``round(L * i / 4)`` for i = 1..4 (halves up), deduplicated: ViT-L {6, 12, 18, 24}, 3 blocks {1, 2, 3}."""
    return sorted({max(1, int(math.floor(num_layers * i / 4 + 0.5))) for i in range(1, 5)})


# ------------------------------------------------------------------------------------------ the detector
class VisualADDetector(Detector):
    name = "visualad"
    summary = ("VisualAD: anomaly/normal tokens inside a frozen ViT (its own forward), trained on an auxiliary "
               "dataset (zero-shot)")
    trainable = True

    @dataclass(frozen=True)
    class Settings:
        backbone: str = "tiny-openclip"
        weights: str = ""  # empty: the registry default (tiny / NAME@random: none needed); "random": seeded init
        image_size: int = 0  # 0: the backbone's
        layers: tuple[int, ...] = ()  # empty: 4 evenly spaced blocks
        anchors: int = 4
        isolate: bool = True  # deviation: one-way attention, the patch tokens stay the backbone's own
        residual_align: bool = True  # deviation: p̂ = p + MLP(p), zero-initialised
        epochs: int = 2
        batch_images: int = 8
        lr_tokens: float = 1e-3
        lr_modules: float = 1e-4
        weight_decay: float = 0.01
        margin: float = 0.5
        smooth_sigma: float = 4.0  # at 518 px, scaled with the map size
        seed: int = 0
        pooling: str = "top:1%"
        device: str = "cpu"

        def __post_init__(self) -> None:
            from spg_dist.backbones import UnknownBackboneError, get_config, resolve_layers

            try:
                cfg = get_config(self.backbone)
            except UnknownBackboneError as e:
                raise DetectorConfigError(f"visualad: {e}") from None
            if cfg.family not in SUPPORTED_FAMILIES:
                raise DetectorConfigError(f"visualad: backbone {self.backbone!r} is of family {cfg.family!r}; "
                                          f"supported families: {', '.join(SUPPORTED_FAMILIES)}")
            if self.image_size < 0 or self.image_size % cfg.patch_size:
                raise DetectorConfigError(f"visualad: image_size={self.image_size} must be 0 (the backbone's) or a "
                                          f"positive multiple of the patch size {cfg.patch_size}")
            try:
                resolved = resolve_layers(list(self.layers), cfg.num_layers, cfg.name) if self.layers else []
            except ValueError as e:
                raise DetectorConfigError(f"visualad: layers: {e}") from None
            if len(set(resolved)) != len(resolved):
                raise DetectorConfigError(f"visualad: layers={self.layers} name a block twice")
            checks = [(self.anchors >= 1, "anchors must be >= 1"), (self.epochs >= 0, "epochs must be >= 0"),
                      (self.batch_images >= 1, "batch_images must be >= 1"),
                      (self.lr_tokens > 0 and self.lr_modules > 0, "lr_tokens and lr_modules must be > 0"),
                      (self.weight_decay >= 0, "weight_decay must be >= 0"),
                      (0.0 <= self.margin <= 1.0, "margin must be in [0, 1] (cos(t_a, t_n) <= -margin)"),
                      (self.smooth_sigma >= 0, "smooth_sigma must be >= 0"), (bool(self.device), "device is empty")]
            for ok, why in checks:
                if not ok:
                    raise DetectorConfigError(f"visualad: {why}")
            try:
                parse_pooling(self.pooling)
            except ValueError as e:
                raise DetectorConfigError(f"visualad: {e}") from None

    def __init__(self, settings: Any = None, **overrides: Any) -> None:
        super().__init__(settings, **overrides)
        from spg_dist.backbones import get_config, resolve_layers

        s = self.settings
        cfg = get_config(s.backbone)
        self.config = cfg
        self.image_size = s.image_size or cfg.image_size
        self.grid = self.image_size // cfg.patch_size
        self.layers = sorted(resolve_layers(list(s.layers), cfg.num_layers)) if s.layers else \
            default_layers(cfg.num_layers)
        self.backbone: Any = None
        self.vit: TokenViT | None = None
        self.head: VisualADHead | None = None
        self.fitted = False
        self.curve: list[dict[str, float]] = []
        self.steps_done = 0

    # ---------------------------------------------------------------- identity
    @property
    def backbone_name(self) -> str:
        """The name of the ViT that runs (``NAME@random`` for a seeded random init)."""
        from spg_dist.backbones import RANDOM_SUFFIX, RANDOM_WEIGHTS

        if self.backbone is not None:
            return self.backbone.name
        name = self.config.name
        if self.settings.weights == RANDOM_WEIGHTS and not name.endswith(RANDOM_SUFFIX) and not self.config.untrained:
            name += RANDOM_SUFFIX
        return name

    def inputs(self) -> Inputs:
        return Inputs(layers=(), aux=True, images=True, scope="dataset", mask_size=self.image_size)

    @property
    def pool_on(self) -> str:
        return "map"

    def params(self) -> dict[str, Any]:
        return {**super().params(), "backbone_ran": self.backbone_name, "family": self.config.family,
                "layers_used": list(self.layers), "image_size_used": self.image_size, "grid": self.grid,
                "note": f"runs its own ViT ({self.backbone_name}), not the stored tokens",
                "deviations": {
                    "isolate": ("one-way attention: the learnable tokens attend to the sequence, the patches never "
                                "to them (patch tokens = the backbone's own)" if self.settings.isolate else
                                "off: joint attention as the reference"),
                    "residual_align": ("residual alignment MLP, zero-initialised last Linear (identity at init)"
                                       if self.settings.residual_align else "off: plain MLP as the reference"),
                    "token_positions": "class token's position embedding, frozen (the reference learns a copy)"}}

    # ---------------------------------------------------------------- model
    def build(self) -> "VisualADDetector":
        """Build the frozen backbone and the (seeded) learned parts; idempotent."""
        if self.head is not None:
            return self
        from spg_dist.backbones import create_backbone
        from spg_dist.backbones.tiny import seeded

        s = self.settings
        self.backbone = create_backbone(s.backbone, weights=s.weights or None, device=s.device,
                                        image_size=self.image_size)
        self.vit = TokenViT(self.backbone)
        with seeded(s.seed):
            head = VisualADHead(self.vit.dim, self.vit.final_norm, len(self.layers), s.anchors, self.grid ** 2,
                                s.residual_align)
        self.head = head.to(self.backbone.device).eval()
        return self

    def forward(self, pixels: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B, H, W, 3] at ``image_size`` -> (per-layer maps [K, B, g, g], last layer's enhanced tokens
        [B, 2, C]); grad flows into the head when enabled."""
        self.build()
        head, vit = self.head, self.vit
        x = _as_pixels(self.backbone, pixels)
        states, z = vit.forward(x, head.tokens(), self.settings.isolate, self.layers)
        t = head.norm(z)  # [B, 2, C]
        b = x.shape[0]
        maps, enhanced = [], t
        for j, layer in enumerate(self.layers):
            p = head.norm(states[layer][:, vit.num_prefix:])  # [B, N, C]
            enhanced = head.sca[j](t, p)
            ph = head.align[j](p)
            s = cosine(ph, enhanced[:, 0:1]) - cosine(ph, enhanced[:, 1:2])
            maps.append(s.reshape(b, self.grid, self.grid))
        return torch.stack(maps), enhanced

    def _load_pixels(self, uris: Sequence[str]) -> torch.Tensor:
        from spg_dist.data.imageio import load_image

        return torch.from_numpy(np.stack([load_image(u, self.image_size, resample=self.config.resample)
                                          for u in uris]))

    def _aux_arrays(self, aux: TokenSet) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        if aux.image_uris is None:
            raise DetectorConfigError("visualad: the auxiliary set has no image_uris (this detector reads pixels)")
        if aux.masks is None:
            raise DetectorConfigError("visualad: the auxiliary set has no masks")
        masks = torch.from_numpy(np.asarray(aux.masks)).float()
        if masks.shape[-2:] != (self.image_size, self.image_size):
            masks = F.interpolate(masks[:, None], size=(self.image_size, self.image_size), mode="nearest")[:, 0]
        masks = (masks > 0.5).float()
        labels = torch.as_tensor(np.asarray(aux.labels), dtype=torch.float32).reshape(-1)
        hidden = labels < 0
        labels[hidden] = (masks[hidden].flatten(1).amax(1) > 0).float()
        return list(aux.image_uris), masks, labels

    def evaluate_loss(self, aux: TokenSet) -> dict[str, float]:
        """The training loss on ``aux`` in eval mode (no dropout, no gradient), image-weighted mean."""
        self.build()
        uris, masks, labels = self._aux_arrays(aux)
        dev = self.backbone.device
        sums: dict[str, float] = {}
        self.head.eval()
        with torch.no_grad():
            for s in range(0, len(uris), self.settings.batch_images):
                maps, t = self.forward(self._load_pixels(uris[s:s + self.settings.batch_images]))
                _, terms = visualad_loss(maps, t, masks[s:s + maps.shape[1]].to(dev),
                                         labels[s:s + maps.shape[1]].to(dev), self.settings.margin)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v * maps.shape[1]
        return {k: v / len(uris) for k, v in sums.items()}

    def fit(self, data: FitData, on_step: Callable[[dict[str, Any]], None] | None = None) -> "VisualADDetector":
        aux = data.need("aux", "visualad")
        s = self.settings
        self.build()
        uris, masks, labels = self._aux_arrays(aux)
        head, dev = self.head, self.backbone.device
        tokens = [head.t_a, head.t_n]
        others = [p for n, p in head.named_parameters() if n not in ("t_a", "t_n")]
        optimizer = torch.optim.AdamW([{"params": tokens, "lr": s.lr_tokens},
                                       {"params": others, "lr": s.lr_modules}], weight_decay=s.weight_decay)
        # cosine annealing per epoch down to 0.1 x each group's rate (the reference's CosineAnnealingLR)
        t_max = max(1, s.epochs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(e, t_max) / t_max)))
        rng = np.random.default_rng(s.seed)
        devices = [dev.index or 0] if dev.type == "cuda" else []
        self.curve = []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(s.seed)
            head.train()
            try:
                for epoch in range(s.epochs):
                    order = rng.permutation(len(uris))
                    for start in range(0, len(order), s.batch_images):
                        idx = order[start:start + s.batch_images]
                        maps, t = self.forward(self._load_pixels([uris[i] for i in idx]))
                        loss, terms = visualad_loss(maps, t, masks[idx].to(dev), labels[idx].to(dev), s.margin)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        for p in tokens:
                            torch.nn.utils.clip_grad_norm_([p], max_norm=1.0)
                        optimizer.step()
                        self.steps_done += 1
                        row = {"epoch": epoch, "step": self.steps_done, **terms}
                        self.curve.append(row)
                        if on_step is not None:
                            on_step(row)
                    scheduler.step()
            finally:
                head.eval()
        self.fitted = True
        return self

    @torch.no_grad()
    def score_pixels(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        """uint8 [M, S, S, 3] at ``image_size`` -> maps [M, g, g] float32 (summed over layers, unsmoothed)."""
        self.build()
        self.head.eval()
        out = []
        for s in range(0, pixels.shape[0], self.settings.batch_images):
            maps, _ = self.forward(pixels[s:s + self.settings.batch_images])
            out.append(maps.sum(0).float().cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.grid, self.grid), np.float32)

    def score(self, batch: TokenSet | ArrayLike) -> np.ndarray:
        """Anomaly maps [M, g, g] on the ViT's patch grid (summed over layers) of ``batch.image_uris`` (or of a
        uint8 [M, S, S, 3] array of pixels)."""
        if not self.fitted:
            raise RuntimeError("visualad: score called before fit (or load_state_dict)")
        if isinstance(batch, TokenSet):
            if batch.image_uris is None:
                raise DetectorConfigError("visualad: the batch has no image_uris (this detector reads pixels)")
            uris = list(batch.image_uris)
            maps = [self.score_pixels(self._load_pixels(uris[s:s + self.settings.batch_images]))
                    for s in range(0, len(uris), self.settings.batch_images)]
            return np.concatenate(maps) if maps else np.zeros((0, self.grid, self.grid), np.float32)
        return self.score_pixels(batch)

    def postprocess_maps(self, maps: np.ndarray) -> np.ndarray:
        """Gaussian smoothing of each map [M, H, W], sigma = smooth_sigma x H / 518 (and x W / 518)."""
        from scipy.ndimage import gaussian_filter

        maps = np.asarray(maps, dtype=np.float32)
        if self.settings.smooth_sigma <= 0:
            return maps
        sigma = (self.settings.smooth_sigma * maps.shape[-2] / REFERENCE_SIZE,
                 self.settings.smooth_sigma * maps.shape[-1] / REFERENCE_SIZE)
        return np.stack([gaussian_filter(m, sigma=sigma) for m in maps]).astype(np.float32) if len(maps) else maps

    # ---------------------------------------------------------------- learned state
    def state_dict(self) -> dict[str, torch.Tensor]:
        self.build()
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.head.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.build()
        own = self.head.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = sorted(k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
        if missing or unexpected or wrong:
            raise DetectorConfigError(f"visualad: state does not fit these settings (missing {missing[:3]}, "
                                      f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]})")
        self.head.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
        self.head.eval()
        self.fitted = True


__all__ = ["AlignMLP", "SUPPORTED_FAMILIES", "SpatialCrossAttention", "TokenViT", "VisualADDetector",
           "VisualADHead", "default_layers", "insert_tokens_forward", "margin_loss", "visualad_loss"]
