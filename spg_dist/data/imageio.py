"""Image and mask decoding: the one place pixels enter the system.

Every failure mode (missing file, corrupt bytes, truncated download) surfaces as ``ImageDecodeError`` naming the
file, so the extraction pipeline can turn it into an ``errors`` row instead of a crashed Ray task or, worse, a
silently grey-padded image whose tokens poison the SAE.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from spg_dist.data.records import DatasetError
from spg_dist.errors import SpgError

# Pillow pads truncated files with grey when this is True; a half-decoded image must fail loudly instead.
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


class ImageDecodeError(SpgError, ValueError):
    """An image or mask file that is missing, unreadable, corrupt or truncated; the message names the file."""


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """True for the raster extensions every reader accepts (case-insensitive), hidden files excluded."""
    p = Path(path)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def check_dataset_root(root: str | os.PathLike[str], layout: str) -> Path:
    """Absolute root of a dataset, or a one-line ``DatasetError`` when it is missing or not a folder."""
    p = Path(os.path.expanduser(str(root))).absolute()
    if not p.exists():
        raise DatasetError(f"{layout} dataset root does not exist: {p} (check the path, or create the dataset with "
                           f"`spg datasets synth`)")
    if not p.is_dir():
        raise DatasetError(f"{layout} dataset root is not a directory: {p} (pass the folder that holds the dataset)")
    return p


def _local_path(uri: str | os.PathLike[str]) -> str:
    s = os.fspath(uri)
    return s[len("file://"):] if s.startswith("file://") else s


def _open_decoded(uri: str | os.PathLike[str], what: str) -> Image.Image:
    """Open and fully decode a file: ``Image.open`` is lazy, so truncation only shows on ``load()``."""
    path = _local_path(uri)
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # someone else's import may have flipped it; we never want padding
    try:
        im = Image.open(path)
        im.load()
    except FileNotFoundError:
        raise ImageDecodeError(f"{what} file not found: {path}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"cannot decode {what} {path}: {type(e).__name__}: {e}") from e
    return im


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """RGB uint8; 16-bit and float greyscale are rescaled rather than clipped (Pillow's convert clips them)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") else max(float(a.max()), 1.0)
        g = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_image(uri: str | os.PathLike[str], size: int | None = None, resample: str = "bicubic") -> np.ndarray:
    """Decode an image to RGB uint8 ``[H, W, 3]``, resized to ``(size, size)`` when ``size`` is given."""
    if resample not in _RESAMPLE:
        raise ValueError(f"unknown resample {resample!r}; use one of {', '.join(sorted(_RESAMPLE))}")
    im = _open_decoded(uri, "image")
    rgb = _to_rgb_array(im)
    if size is not None and rgb.shape[:2] != (size, size):
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), _RESAMPLE[resample]), dtype=np.uint8)
    return np.ascontiguousarray(rgb)


def load_mask(uri: str | os.PathLike[str], size: int | None = None) -> np.ndarray:
    """Decode a mask to uint8 ``{0, 1}`` ``[H, W]`` (nearest resize); ``""`` means all-normal and needs ``size``.

    Any non-zero value is foreground: MVTec masks are 0/255, VisA masks hold small per-defect label values.
    """
    if os.fspath(uri) == "":
        if size is None:
            raise ValueError("load_mask('') needs a size: an empty mask URI means an all-zero mask of that size")
        return np.zeros((size, size), dtype=np.uint8)
    im = _open_decoded(uri, "mask")
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        fg = np.asarray(im) != 0
    else:
        fg = np.asarray(im.convert("L")) != 0
    if size is not None and fg.shape != (size, size):
        small = Image.fromarray(fg.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)
        fg = np.asarray(small) != 0
    return fg.astype(np.uint8)


def image_size(uri: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) from the file header without decoding pixels, for the ``images`` table."""
    path = _local_path(uri)
    try:
        with Image.open(path) as im:
            return int(im.width), int(im.height)
    except FileNotFoundError:
        raise ImageDecodeError(f"image file not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"cannot read image header {path}: {type(e).__name__}: {e}") from e
