"""Image and mask decoding: the one place pixels enter the system.

Every failure mode (missing file, corrupt bytes, truncated download, a header claiming more pixels than allowed,
any other exception Pillow raises for one file) surfaces as ``ImageDecodeError`` naming the file, so the
extraction pipeline can turn it into an ``errors`` row instead of a crashed Ray task or, worse, a silently
grey-padded image whose tokens poison the SAE.

Hostile files are refused before their pixels are decoded:

- **Pixel limit.** The header's width x height is checked against a limit *before* decoding: ``max_pixels``
  when a caller passes it, else the environment variable ``SPG_MAX_IMAGE_PIXELS`` (a positive integer; set it in
  the Ray job's ``runtime_env`` on a remote cluster), else :data:`MAX_PIXELS` (64 megapixels: MVTec AD and VisA
  images are at most ~1.6k x 1.1k, so this is ~35x headroom while a decoded RGB image stays under 200 MB). A
  file over it raises ``ImageDecodeError`` naming the file, its size and the limit. Pillow's own
  decompression-bomb check (``PIL.Image.MAX_IMAGE_PIXELS``: a warning over it, ``DecompressionBombError`` over
  twice it) is caught and reported the same way and its warning is silenced: with the default limit it can never
  fire first; a larger ``max_pixels`` also needs a larger ``PIL.Image.MAX_IMAGE_PIXELS``.
- **Formats.** Only the raster formats of :data:`DECODE_FORMATS` are decoded, whatever the extension says (no
  EPS, which would run Ghostscript, nor Pillow's rarely used plugins).
- **Files only.** A path that is not a regular file (a folder, a FIFO, a device) is refused, never read.
- **Refused paths.** A URI ``outside-root:...`` (a dataset-file path that leaves the dataset root, see
  :mod:`spg_dist.data.records`) is refused without touching the filesystem.
"""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from spg_dist.data.records import DatasetError, outside_root_message, outside_root_path, printable
from spg_dist.errors import SpgError

# Pillow pads truncated files with grey when this is True; a half-decoded image must fail loudly instead.
ImageFile.LOAD_TRUNCATED_IMAGES = False

MAX_PIXELS = 64_000_000  # default limit on width x height of any image or mask decoded (see the module doc)
MAX_PIXELS_ENV = "SPG_MAX_IMAGE_PIXELS"
# Pillow format ids decoded (JPEG includes camera MPO files). Content decides, not the extension.
DECODE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")
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
    """An image or mask file that is missing, unreadable, corrupt, truncated, over the pixel limit or refused;
    the message (one line) names the file."""


class MaskError(ImageDecodeError):
    """A mask that decodes but cannot be used with its image: another size, or empty on an anomalous image."""


class ImageLimitError(SpgError, ValueError):
    """A pixel-limit setting that is not a positive integer (a configuration error: fails the job, once)."""


def resolve_max_pixels(max_pixels: int | None = None) -> int:
    """The pixel limit in force: ``max_pixels``, else ``$SPG_MAX_IMAGE_PIXELS``, else :data:`MAX_PIXELS`."""
    if max_pixels is None:
        env = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not env:
            return MAX_PIXELS
        try:
            max_pixels = int(env.replace("_", ""))
        except ValueError:
            raise ImageLimitError(f"{MAX_PIXELS_ENV}={env!r} is not a whole number of pixels: set it to e.g. "
                                  f"{MAX_PIXELS} or unset it") from None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels <= 0:
        raise ImageLimitError(f"max_pixels must be a positive whole number of pixels, got {max_pixels!r} "
                              f"(default {MAX_PIXELS})")
    return int(max_pixels)


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


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _pillow_limit() -> int | None:
    """Pixels over which Pillow raises ``DecompressionBombError`` in ``Image.open`` (None: its check is off)."""
    m = Image.MAX_IMAGE_PIXELS
    return None if m is None else 2 * int(m)


def _formats() -> tuple[str, ...]:
    """:data:`DECODE_FORMATS` this Pillow build can open (a missing plugin must not turn into a KeyError)."""
    Image.init()  # a no-op after the first call
    return tuple(f for f in DECODE_FORMATS if f in Image.OPEN)


def _open_header(uri: str | os.PathLike[str], what: str, max_pixels: int | None) -> Image.Image:
    """Open a file lazily (header only: no pixel is decoded) after every check that needs no pixels; the caller
    closes it. ``max_pixels`` None skips the limit (reading a size is harmless)."""
    raw = outside_root_path(os.fspath(uri))
    if raw is not None:
        raise ImageDecodeError(outside_root_message(what, raw))
    path = _local_path(uri)
    shown = printable(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageDecodeError(f"{what} file not found: {shown}") from None
    except (OSError, ValueError) as e:
        raise ImageDecodeError(f"cannot read {what} {shown}: {_one_line(e)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageDecodeError(f"{what} is not a regular file: {shown}")
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # someone else's import may have flipped it; we never want padding
    with warnings.catch_warnings():
        # over PIL.Image.MAX_IMAGE_PIXELS Pillow only warns (an error under `-W error`); our own limit decides
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path, formats=_formats())
        except FileNotFoundError:
            raise ImageDecodeError(f"{what} file not found: {shown}") from None
        except Image.DecompressionBombError as e:
            limit = min((x for x in (max_pixels, _pillow_limit()) if x is not None), default=0)
            raise ImageDecodeError(f"{what} {shown} is over the pixel limit of {limit:,} pixels, not decoded "
                                   f"(Pillow: {_one_line(e)})") from None
        except Exception as e:  # noqa: BLE001 - hostile headers raise many types; one file never fails a batch
            raise ImageDecodeError(f"cannot decode {what} {shown}: {_one_line(e)}") from None
    try:
        w, h = int(im.width), int(im.height)
    except Exception as e:  # noqa: BLE001
        im.close()
        raise ImageDecodeError(f"cannot decode {what} {shown}: {_one_line(e)}") from None
    if max_pixels is not None and w * h > max_pixels:
        im.close()
        raise ImageDecodeError(f"{what} {shown} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
                               f"pixels, not decoded (raise max_pixels or {MAX_PIXELS_ENV} if it is genuine)")
    return im


def _decode(im: Image.Image, uri: str | os.PathLike[str], what: str, convert):
    """``convert(im)`` after a full decode (``Image.open`` is lazy: truncation only shows on ``load()``), with every
    exception turned into ``ImageDecodeError`` naming the file; closes ``im``."""
    try:
        with im:
            im.load()
            return convert(im)
    except ImageDecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - struct.error, IndexError, ... from a hostile body: still this file's error
        raise ImageDecodeError(f"cannot decode {what} {printable(_local_path(uri))}: {_one_line(e)}") from None


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """RGB uint8; 16-bit and float greyscale are rescaled rather than clipped (Pillow's convert clips them)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") else max(float(a.max()), 1.0)
        g = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_image_and_size(uri: str | os.PathLike[str], size: int | None = None, resample: str = "bicubic",
                        max_pixels: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`load_image` plus the file's own ``(width, height)``, from one open of the file."""
    if resample not in _RESAMPLE:
        raise ValueError(f"unknown resample {resample!r}; use one of {', '.join(sorted(_RESAMPLE))}")
    im = _open_header(uri, "image", resolve_max_pixels(max_pixels))
    wh = (int(im.width), int(im.height))

    def convert(im: Image.Image) -> np.ndarray:
        rgb = _to_rgb_array(im)
        if size is not None and rgb.shape[:2] != (size, size):
            rgb = np.asarray(Image.fromarray(rgb).resize((size, size), _RESAMPLE[resample]), dtype=np.uint8)
        return np.ascontiguousarray(rgb)

    return _decode(im, uri, "image", convert), wh


def load_image(uri: str | os.PathLike[str], size: int | None = None, resample: str = "bicubic",
               max_pixels: int | None = None) -> np.ndarray:
    """Decode an image to RGB uint8 ``[H, W, 3]``, resized to ``(size, size)`` when ``size`` is given.

    ``max_pixels``: refuse (``ImageDecodeError``, before decoding) a file whose header says more pixels; None
    means ``$SPG_MAX_IMAGE_PIXELS`` or :data:`MAX_PIXELS` (64 MP).
    """
    return load_image_and_size(uri, size, resample, max_pixels)[0]


def _foreground(im: Image.Image) -> np.ndarray:
    """bool ``[H, W]``: any non-zero value is foreground (MVTec masks are 0/255, VisA's hold small label values)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return np.asarray(im) != 0
    return np.asarray(im.convert("L")) != 0


def load_mask(uri: str | os.PathLike[str], size: int | None = None, max_pixels: int | None = None) -> np.ndarray:
    """Decode a mask to uint8 ``{0, 1}`` ``[H, W]`` (nearest resize); ``""`` means all-normal and needs ``size``.

    Any non-zero value is foreground: MVTec masks are 0/255, VisA masks hold small per-defect label values.
    ``max_pixels`` as in :func:`load_image`.
    """
    if os.fspath(uri) == "":
        if size is None:
            raise ValueError("load_mask('') needs a size: an empty mask URI means an all-zero mask of that size")
        return np.zeros((size, size), dtype=np.uint8)
    fg = _decode(_open_header(uri, "mask", resolve_max_pixels(max_pixels)), uri, "mask", _foreground)
    if size is not None and fg.shape != (size, size):
        small = Image.fromarray(fg.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)
        fg = np.asarray(small) != 0
    return fg.astype(np.uint8)


def check_mask(uri: str | os.PathLike[str], image_wh: tuple[int, int], anomalous: bool,
               max_pixels: int | None = None) -> None:
    """Raise unless the mask can be used for its image: readable (as :func:`load_mask`), of the image's own
    ``(width, height)`` (``MaskError`` naming both sizes: a mask is never stretched to fit), and, when the image
    is labelled anomalous, not all zero (``MaskError``). The size comes from the header; only an anomalous
    image's mask is decoded (masks are small 1/8-bit files)."""
    im = _open_header(uri, "mask", resolve_max_pixels(max_pixels))
    path = printable(_local_path(uri))
    mw, mh = int(im.width), int(im.height)
    if (mw, mh) != tuple(image_wh):
        im.close()
        w, h = image_wh
        raise MaskError(f"mask {path} is {mw}x{mh} but its image is {w}x{h}: a mask must have its image's size, "
                        f"it is not stretched")
    if not anomalous:
        im.close()
        return
    if not _decode(im, uri, "mask", lambda m: bool(_foreground(m).any())):
        raise MaskError(f"anomalous image has an empty mask: {path} is all zero (fix the mask or label the image "
                        f"normal)")


def image_size(uri: str | os.PathLike[str], max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) from the file header without decoding pixels, for the ``images`` table. No pixel limit
    unless ``max_pixels`` is given (reading a header is harmless); Pillow's own bomb check is still reported as
    an ``ImageDecodeError``."""
    with _open_header(uri, "image", max_pixels) as im:
        return int(im.width), int(im.height)
