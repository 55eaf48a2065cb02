"""A classical, weight-free texture encoder behind the :class:`~spg_dist.backbones.base.Backbone` interface.

``texture-filterbank`` (family ``"classical"``) turns each 16x16 patch of a 224 px image into a 142-d vector
of hand-made colour and texture statistics: a 14x14x142 grid, layer 1 (its only "layer"). It has no weights
(``weights`` must be None), is fully deterministic, and runs as a handful of batched ``conv2d`` calls with
fixed kernels on the backbone's device (float32 even on CUDA: autocast is switched off inside). It is the
offline demo's default encoder: few-shot kNN on these features separates synthetic defects far better than
random-init ViTs do.

Input. ``normalise`` (mean 0, std 1) hands over RGB in [0, 1]. From it:

* intensity ``I = (R + G + B) / 3``;
* opponent colours ``O1 = (R - G) / sqrt(2)`` (red-green) and ``O2 = (R + G - 2B) / sqrt(6)`` (yellow-blue).

Base features, per patch (71 dims), in this order:

1. **Colour** (8): patch mean of I, O1, O2; patch standard deviation of I, O1, O2; patch min and max of I.
2. **Texture at three scales** s = 1, 2, 4 px (21 each, 63 in all). Scale s is level log2(s) of a Gaussian
   pyramid (level l+1 = 5-tap binomial blur of level l, subsampled by 2); the *same* kernels run at every
   level, so in full-resolution pixels their size doubles per scale and the responses are scale-normalised.
   On each level seven non-negative response maps are computed from I (and O1, O2 for the last):

   * ``gabor0``, ``gabor45``, ``gabor90``, ``gabor135``: Gabor energy sqrt(even^2 + odd^2) of a quadrature
     pair with wavelength 4s px and Gaussian envelope sigma 1.5s px; the angle is the direction of the
     carrier's wave vector, so ``gabor0`` responds to intensity varying along x (vertical stripes / edges),
     ``gabor90`` to intensity varying along y (horizontal stripes). The even kernel is made zero-sum, so a
     flat image gives exactly zero; both are scaled so a matched unit-amplitude sinusoid gives energy ~1;
   * ``log``: |Laplacian of Gaussian| (sigma s px, zero-sum, scale-normalised by sigma^2) - blobs, holes, spots;
   * ``grad``: intensity gradient magnitude (derivative-of-Gaussian, sigma s px, scaled so a unit ramp gives 1);
   * ``cgrad``: colour gradient magnitude sqrt(|grad O1|^2 + |grad O2|^2), same kernels.

   Each map is pooled over the patch (16/s x 16/s level pixels) as **mean, std and max**: for each scale the
   21 dims are ordered stat-major (the 7 means, then the 7 stds, then the 7 maxes).

Neighbourhood features (71 dims): the same 71 base features averaged over the patch's 3x3 neighbourhood on
the patch grid (``avg_pool2d(3, stride 1, padding 1, count_include_pad=False)``: border patches average their
existing neighbours only). Output = base ++ neighbourhood = 142 dims; :data:`FEATURE_NAMES` names every column
(``I_mean``, ``s2_gabor90_max``, ``nbr_s4_log_std``, ...).

Features are in natural units (intensities in [0, 1]), not standardised: scale them (e.g. z-score on the
nominal/reference set) before a distance-based method if the scales matter.

The texture responses are sampled at every second pixel of their level (stride-2 convolutions; the filters'
passbands lie well below each level's Nyquist and the maps only feed patch statistics), which makes the bank
4x cheaper: about 100-200 images/s at 224 px on 2 CPU threads.

Convolutions use replicate padding, so a flat image has no border responses at any size; the spatial support
of a patch's base features reaches at most :data:`RECEPTIVE_RADIUS_PX` px beyond the patch (coarsest scale);
its scale-1 features read pixels at most 5 px beyond it, its colour statistics only its own pixels.
``image_size`` may be any multiple of 16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Backbone, BackboneConfig, WeightsMismatchError

SCALES = (1, 2, 4)  # px, = 2**level of the pyramid
ORIENTATIONS = (0, 45, 90, 135)  # degrees: direction of the Gabor carrier's wave vector
GABOR_WAVELENGTH = 4.0  # level px
GABOR_SIGMA = 1.5  # level px (envelope)
DOG_SIGMA = 1.0  # level px (LoG and derivative-of-Gaussian)
MAPS = tuple(f"gabor{o}" for o in ORIENTATIONS) + ("log", "grad", "cgrad")
STATS = ("mean", "std", "max")
COLOUR_FEATURES = ("I_mean", "O1_mean", "O2_mean", "I_std", "O1_std", "O2_std", "I_min", "I_max")
BASE_FEATURES = COLOUR_FEATURES + tuple(f"s{s}_{m}_{st}" for s in SCALES for st in STATS for m in MAPS)
FEATURE_NAMES = BASE_FEATURES + tuple(f"nbr_{n}" for n in BASE_FEATURES)
PATCH = 16

_R_BANK = math.ceil(3 * GABOR_SIGMA)  # 5: radius of the I bank (Gabor, LoG, gradient) -> 11x11
_R_GRAD = math.ceil(3 * DOG_SIGMA)  # 3: radius of the colour-gradient kernels -> 7x7
_R_BLUR = 2  # binomial 5-tap pyramid filter
# full-resolution reach of the coarsest level's filters: the pyramid's blurs (2 + 2*2 px) plus the bank (4 * 5 px)
RECEPTIVE_RADIUS_PX = _R_BLUR * (1 + 2) + _R_BANK * 2 ** (len(SCALES) - 1)

TEXTURE_DESCRIPTION = (
    f"Classical texture filter bank, no weights: per 16x16 patch, mean/std of intensity and two opponent colours "
    f"(O1=(R-G)/sqrt2, O2=(R+G-2B)/sqrt6) and min/max of intensity (8); at scales 1, 2, 4 px (Gaussian pyramid) "
    f"Gabor energy at 0/45/90/135 deg (wavelength 4s, sigma 1.5s), |LoG| (sigma s), intensity and opponent-colour "
    f"gradient magnitude, each pooled as patch mean/std/max (63); plus the same {len(BASE_FEATURES)} features "
    f"averaged over the 3x3 patch neighbourhood. 224 px -> 14x14x{len(FEATURE_NAMES)}, float32, deterministic."
)

CLASSICAL_CONFIGS: list[BackboneConfig] = [
    BackboneConfig(
        name="texture-filterbank", family="classical", source="", image_size=224, patch_size=PATCH,
        dim=len(FEATURE_NAMES), num_layers=1, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), num_prefix_tokens=0,
        untrained=False, description=TEXTURE_DESCRIPTION, resample="bicubic",
    ),
]


def check_classical_weights(config: BackboneConfig, weights: str | None) -> None:
    """A filter bank has no weights: anything but None (including ``"random"``) is refused."""
    if weights is not None or config.untrained:
        raise WeightsMismatchError(f"{config.name} is a fixed classical filter bank with no weights; "
                                   f"pass no weights (got {weights!r})")


def _grid(radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.arange(-radius, radius + 1, dtype=torch.float64)
    y, x = torch.meshgrid(r, r, indexing="ij")  # y down the rows, x along the columns
    return x, y


def _gaussian(x: torch.Tensor, y: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2))


def _gradient_kernels(radius: int, sigma: float) -> torch.Tensor:
    """d/dx, d/dy derivative-of-Gaussian kernels (for correlation), scaled so a unit ramp gives exactly 1."""
    x, y = _grid(radius)
    g = _gaussian(x, y, sigma)
    kx = x * g / (x * x * g).sum()
    ky = y * g / (y * y * g).sum()
    return torch.stack([kx, ky])


def _intensity_bank() -> torch.Tensor:
    """[11, 1, 11, 11]: 4 x (even, odd) Gabor, LoG, d/dx, d/dy - all zero-sum, float64 before the cast."""
    x, y = _grid(_R_BANK)
    env = _gaussian(x, y, GABOR_SIGMA)
    kernels = []
    for angle in ORIENTATIONS:
        theta = math.radians(angle)
        phase = (2 * math.pi / GABOR_WAVELENGTH) * (x * math.cos(theta) + y * math.sin(theta))
        even, odd = env * torch.cos(phase), env * torch.sin(phase)
        even = even - env * (even.sum() / env.sum())  # no DC response
        scale = env.sum() / 2  # matched unit sinusoid -> energy ~1
        kernels += [even / scale, odd / scale]
    g = _gaussian(x, y, DOG_SIGMA)
    log = (x ** 2 + y ** 2 - 2 * DOG_SIGMA ** 2) / DOG_SIGMA ** 4 * g
    log = log / g.sum()
    log = log - log.mean()  # zero-sum on the discrete grid
    kernels.append(log * DOG_SIGMA ** 2)
    grad = torch.zeros(2, 2 * _R_BANK + 1, 2 * _R_BANK + 1, dtype=torch.float64)
    c = _R_BANK - _R_GRAD
    grad[:, c:c + 2 * _R_GRAD + 1, c:c + 2 * _R_GRAD + 1] = _gradient_kernels(_R_GRAD, DOG_SIGMA)
    kernels += list(grad)
    return torch.stack(kernels).unsqueeze(1)


def _patch_stats(maps: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, C, h, w] -> mean, std (two-pass, exact zero for flat maps), max over p x p patches: [B, C, h/p, w/p]."""
    mean = F.avg_pool2d(maps, p)
    dev = maps - mean.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
    std = F.avg_pool2d(dev * dev, p).sqrt()
    return mean, std, F.max_pool2d(maps, p)


def _map_stats(maps: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-negative response maps [B, C, h, w] -> mean, std, max over q x q cells (one pass: sqrt(E[x^2] - E[x]^2))."""
    mean = F.avg_pool2d(maps, q)
    var = F.avg_pool2d(maps * maps, q) - mean * mean
    return mean, var.clamp_(min=0).sqrt_(), F.max_pool2d(maps, q)


class ClassicalTextureBackbone(Backbone):
    """Fixed filter-bank encoder; see the module docstring for every feature. ``encode`` -> {1: [B, Hp, Wp, 142]}."""

    feature_names = FEATURE_NAMES

    def __init__(self, config: BackboneConfig, device: torch.device | str = "cpu"):
        if config.patch_size % 2 ** (len(SCALES) - 1) or config.image_size % config.patch_size:
            raise ValueError(f"{config.name}: patch {config.patch_size} must be divisible by "
                             f"{2 ** (len(SCALES) - 1)} and image_size {config.image_size} a multiple of it")
        if config.dim != len(FEATURE_NAMES):
            raise ValueError(f"{config.name}: dim {config.dim} != {len(FEATURE_NAMES)} features")
        self.config = config
        self.device = torch.device(device)
        self.bank = _intensity_bank().to(self.device, torch.float32)
        self.colour_grad = _gradient_kernels(_R_GRAD, DOG_SIGMA).unsqueeze(1).to(self.device, torch.float32)
        self.rgb_to_opp = torch.tensor(
            [[1 / 3, 1 / 3, 1 / 3], [1 / math.sqrt(2), -1 / math.sqrt(2), 0.0],
             [1 / math.sqrt(6), 1 / math.sqrt(6), -2 / math.sqrt(6)]], dtype=torch.float32, device=self.device)

    def _level_maps(self, level: torch.Tensor) -> torch.Tensor:
        """(I, O1, O2) [B, 3, h, w] at one pyramid level -> the 7 response maps [B, 7, h/2, w/2].

        The responses are sampled every 2nd level pixel (stride-2 convolutions): the filters' passbands sit
        well below the level's Nyquist, the maps only feed patch statistics, and it makes the bank 4x cheaper.
        """
        b, _, h, w = level.shape
        i = F.pad(level[:, :1], (_R_BANK,) * 4, mode="replicate")
        r = F.conv2d(i, self.bank, stride=2)  # [B, 11, h/2, w/2]
        r2 = r * r
        maps = torch.empty(b, len(MAPS), h // 2, w // 2, device=r.device, dtype=r.dtype)
        torch.add(r2[:, 0:8:2], r2[:, 1:8:2], out=maps[:, :4])
        torch.abs(r[:, 8], out=maps[:, 4])
        torch.add(r2[:, 9], r2[:, 10], out=maps[:, 5])
        o = F.pad(level[:, 1:].reshape(2 * b, 1, h, w), (_R_GRAD,) * 4, mode="replicate")
        cg = F.conv2d(o, self.colour_grad, stride=2)  # [2B, 2, h/2, w/2]: O1 then O2 as batch entries
        cg = (cg * cg).sum(1).view(b, 2, h // 2, w // 2)
        torch.add(cg[:, 0], cg[:, 1], out=maps[:, 6])
        maps[:, :4].sqrt_()
        maps[:, 5:].sqrt_()
        return maps

    @staticmethod
    def _downsample(level: torch.Tensor) -> torch.Tensor:
        """5-tap binomial blur [1, 4, 6, 4, 1]/16 (four 2-box passes) and subsampling by 2; replicate padding."""
        x = F.pad(level, (_R_BLUR,) * 4, mode="replicate")
        for _ in range(3):
            x = F.avg_pool2d(x, 2, stride=1)
        return F.avg_pool2d(x, 2, stride=2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1], float [B, 3, H, W] -> base ++ neighbourhood features [B, 142, Hp, Wp] (float32)."""
        x = x.float()
        p = self.config.patch_size
        opp = torch.einsum("ck,bkhw->bchw", self.rgb_to_opp, x).contiguous()  # (I, O1, O2)
        c_mean, c_std, _ = _patch_stats(opp, p)
        i_min = -F.max_pool2d(-opp[:, :1], p)
        i_max = F.max_pool2d(opp[:, :1], p)
        parts = [c_mean, c_std, i_min, i_max]
        level = opp
        for k, _ in enumerate(SCALES):
            if k:
                level = self._downsample(level)
            parts += _map_stats(self._level_maps(level), p >> (k + 1))
        base = torch.cat(parts, dim=1)
        nbr = F.avg_pool2d(base, 3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([base, nbr], dim=1)

    has_final_norm = False  # no final norm: encode(token="norm") raises NoFinalNormError

    def _forward_layers(self, x: torch.Tensor, layers: list[int], token: str = "block") -> dict[int, torch.Tensor]:
        with torch.autocast(device_type=x.device.type, enabled=False):  # fixed filters: keep float32
            feats = self.features(x).permute(0, 2, 3, 1).contiguous()
        return {layer: feats for layer in layers}


def create_classical_backbone(config: BackboneConfig, weights: str | None, device: torch.device) -> Backbone:
    check_classical_weights(config, weights)
    return ClassicalTextureBackbone(config, device)
