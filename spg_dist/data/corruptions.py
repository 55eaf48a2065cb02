"""Synthetic defects for training on normal images only: CutPaste (Li et al., CVPR 2021) as FoundAD uses it.

Why: FoundAD learns a projector that maps the tokens of a corrupted image back onto the manifold of normal tokens
(the clean tokens of the same image are the target). It needs *paired* clean/corrupted images, made from the
few-shot normal images alone, with the corrupted region known. :func:`cutpaste` makes one such copy:

``"normal"``: a rectangle of 2-25 % of the image area (aspect ratio uniform in [0.3, 1/0.3]) is cut at a random
place, colour-jittered and pasted at another random place. ``"scar"``: a thin strip (width 2-16 px, height 10-25 px
at 256 px, scaled to the image size), colour-jittered, rotated by -45..45 degrees and pasted through its rotated
mask (only the strip's own pixels change, not the corners of its rotated bounding box). ``"union"``: either, 50/50.
Colour jitter is torchvision's ``ColorJitter(0.5, 0.5, 0.5, 0.5)`` (brightness, contrast, saturation factors in
[0.5, 1.5], hue shift in [-0.5, 0.5], in a random order), done with Pillow.

Guarantees: the result is a function of the image and the generator alone (:func:`corruption_seed` gives a seed
per image and copy that is the same in every process), pixels outside the returned mask are byte-identical to the
input, the mask is the pasted region and is never empty, and a copy whose pasted pixels happen to equal the
original is drawn again (a warning if an image cannot be changed at all, e.g. a uniform black image). Pure
NumPy/Pillow: no torch, no store, no Ray.
"""

from __future__ import annotations

import math
import warnings
import zlib

import numpy as np
from PIL import Image, ImageEnhance

CORRUPTION_KINDS = ("union", "normal", "scar")

JITTER = 0.5  # FoundAD's CutPasteUnion(colorJitter=0.5)
AREA_RATIO = (0.02, 0.25)
ASPECT_RATIO = 0.3  # uniform in [0.3, 1 / 0.3]
SCAR_WIDTH = (2, 16)  # pixels at 256 px, [low, high)
SCAR_HEIGHT = (10, 25)
SCAR_ROTATION = (-45.0, 45.0)
_REFERENCE_SIZE = 256
_DRAWS = 8  # fresh draws before a patch is shrunk / before giving up on changing the image


class CorruptionWarning(UserWarning):
    """An image that no CutPaste draw could change (e.g. one flat colour): the copy equals the original."""


def corruption_seed(image_id: str, index: int = 0) -> int:
    """A seed for corrupted copy ``index`` of ``image_id``, the same in every process (CRC-32, not ``hash``)."""
    return zlib.crc32(f"{image_id}\x00{int(index)}".encode("utf-8")) & 0xFFFFFFFF


def _check_image(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"cutpaste needs an RGB uint8 image [H, W, 3], got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a)


def color_jitter(patch: np.ndarray, rng: np.random.Generator, strength: float = JITTER) -> np.ndarray:
    """torchvision-style ``ColorJitter(strength, strength, strength, strength)`` on an RGB uint8 array."""
    im = Image.fromarray(patch)
    factors = {"brightness": rng.uniform(1 - strength, 1 + strength),
               "contrast": rng.uniform(1 - strength, 1 + strength),
               "saturation": rng.uniform(1 - strength, 1 + strength),
               "hue": rng.uniform(-min(strength, 0.5), min(strength, 0.5))}
    for op in rng.permutation(list(factors)):
        f = factors[str(op)]
        if op == "brightness":
            im = ImageEnhance.Brightness(im).enhance(f)
        elif op == "contrast":
            im = ImageEnhance.Contrast(im).enhance(f)
        elif op == "saturation":
            im = ImageEnhance.Color(im).enhance(f)
        else:  # hue: shift H in HSV with wrap-around, as torchvision does for PIL images
            h, s, v = im.convert("HSV").split()
            shifted = (np.asarray(h, dtype=np.int16) + int(round(f * 255))) % 256
            im = Image.merge("HSV", (Image.fromarray(shifted.astype(np.uint8)), s, v)).convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def _normal(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cut a jittered rectangle and paste it elsewhere; (patch pixels [h, w, 3], patch mask [h, w] bool)."""
    H, W = image.shape[:2]
    area = rng.uniform(*AREA_RATIO) * H * W
    aspect = rng.uniform(ASPECT_RATIO, 1 / ASPECT_RATIO)
    cw = int(min(W, max(1, round(math.sqrt(area * aspect)))))
    ch = int(min(H, max(1, round(math.sqrt(area / aspect)))))
    y, x = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
    patch = color_jitter(image[y:y + ch, x:x + cw], rng)
    return patch, np.ones(patch.shape[:2], dtype=bool)


def _scar(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin jittered strip rotated by -45..45 degrees (expanded canvas); its rotated mask says which pixels are
    the strip. Shrinks when the rotated strip does not fit (tiny images)."""
    H, W = image.shape[:2]
    scale = min(H, W) / _REFERENCE_SIZE
    for attempt in range(2 * _DRAWS):
        shrink = 0.5 ** max(0, attempt - _DRAWS + 1)  # fresh draws first, then ever smaller strips
        cw = int(min(W, max(1, round(int(rng.integers(*SCAR_WIDTH)) * scale * shrink))))
        ch = int(min(H, max(1, round(int(rng.integers(*SCAR_HEIGHT)) * scale * shrink))))
        y, x = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
        patch = color_jitter(image[y:y + ch, x:x + cw], rng)
        angle = float(rng.uniform(*SCAR_ROTATION))
        rgba = Image.fromarray(np.dstack([patch, np.full(patch.shape[:2], 255, np.uint8)]), "RGBA")
        rot = np.asarray(rgba.rotate(angle, resample=Image.Resampling.NEAREST, expand=True), dtype=np.uint8)
        mask = rot[:, :, 3] > 0
        if rot.shape[0] <= H and rot.shape[1] <= W and mask.any():
            return np.ascontiguousarray(rot[:, :, :3]), mask
    return patch, np.ones(patch.shape[:2], dtype=bool)  # unrotated: always fits (ch <= H, cw <= W)


def _paste(image: np.ndarray, patch: np.ndarray, pmask: np.ndarray,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    H, W = image.shape[:2]
    ph, pw = pmask.shape
    y, x = int(rng.integers(0, H - ph + 1)), int(rng.integers(0, W - pw + 1))
    out = image.copy()
    region = out[y:y + ph, x:x + pw]
    region[pmask] = patch[pmask]
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y:y + ph, x:x + pw] = pmask
    return out, mask


def cutpaste(image: np.ndarray, rng: np.random.Generator, kind: str = "union") -> tuple[np.ndarray, np.ndarray]:
    """One CutPaste copy of ``image`` (RGB uint8 ``[H, W, 3]``): ``(corrupted uint8 [H, W, 3], mask uint8 {0, 1}
    [H, W])``. ``kind``: ``"union"`` (normal or scar, 50/50), ``"normal"`` or ``"scar"``. See the module docstring
    for the guarantees; deterministic given ``rng``'s state."""
    if kind not in CORRUPTION_KINDS:
        raise ValueError(f"unknown corruption kind {kind!r}; use one of {', '.join(CORRUPTION_KINDS)}")
    image = _check_image(image)
    out = mask = None
    for _ in range(_DRAWS):
        k = kind if kind != "union" else ("normal" if rng.random() < 0.5 else "scar")
        patch, pmask = (_normal if k == "normal" else _scar)(image, rng)
        out, mask = _paste(image, patch, pmask, rng)
        if not np.array_equal(out, image):
            return out, mask
    warnings.warn(f"cutpaste: {_DRAWS} draws left an image of shape {image.shape} unchanged (a flat image?); "
                  f"the corrupted copy equals the original", CorruptionWarning, stacklevel=2)
    return out, mask


__all__ = ["CORRUPTION_KINDS", "CorruptionWarning", "color_jitter", "corruption_seed", "cutpaste"]
