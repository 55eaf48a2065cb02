"""Synthetic anomaly-detection datasets in the MVTec AD or VisA layout, built offline from real photographs.

Why: the demo, the tests and CI need a dataset that exists on every machine without a download, has exact
pixel masks, and is hard enough to be meaningful. The sources are the photographs/textures that ship inside
scikit-image, scikit-learn and matplotlib. Every sample is a jittered crop of one source (the category); anomalous
samples get one industrial-looking defect whose mask is exactly the region the defect altered. The two layouts use
disjoint categories, so training on one and evaluating on the other is a true zero-shot transfer.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from spg_dist.data.records import DatasetError

MVTEC_CATEGORIES = ("brick", "grass", "gravel", "coins", "page", "camera")
VISA_CATEGORIES = ("chelsea", "coffee", "astronaut", "china", "flower", "immunohistochemistry")
# Sources of foreign patches and textures for cut-paste and contamination; never a category of either layout.
FOREIGN_SOURCES = ("rocket", "retina", "colorwheel", "grace_hopper", "clock", "text", "cell", "moon", "logo")
# Categories whose statistics do not depend on orientation, so vertical flips are still "normal".
_ORIENTATION_FREE = frozenset({"brick", "grass", "gravel", "coins", "immunohistochemistry", "cell", "moon"})
_SKIMAGE = ("astronaut", "chelsea", "coffee", "rocket", "retina", "immunohistochemistry", "brick", "grass", "gravel",
            "camera", "moon", "coins", "cell", "clock", "page", "text", "horse", "logo", "colorwheel",
            "microaneurysms")
SOURCES = tuple(sorted(set(_SKIMAGE) | {"china", "flower", "grace_hopper"}))
META_FILE = "synth.json"


@lru_cache(maxsize=None)
def load_source(name: str) -> np.ndarray:
    """A packaged photograph as RGB uint8 (grey → RGB, alpha dropped); read-only and cached."""
    if name in _SKIMAGE:
        import skimage.data

        a = np.asarray(getattr(skimage.data, name)())
    elif name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        a = np.asarray(load_sample_image(f"{name}.jpg"))
    elif name == "grace_hopper":
        import matplotlib.cbook

        with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
            a = np.asarray(im.convert("RGB"))
    else:
        raise ValueError(f"unknown synthetic source {name!r}; available: {', '.join(SOURCES)}")
    if a.dtype == bool:
        a = np.where(a, 235, 20).astype(np.uint8)
    a = a.astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    a = np.ascontiguousarray(a[:, :, :3])
    a.setflags(write=False)
    return a


def sample_view(src: np.ndarray, rng: np.random.Generator, size: int, vflip: bool = True) -> np.ndarray:
    """One 'photograph of a part': random square crop (scale jitter), flips, brightness/contrast jitter, resize."""
    h, w = src.shape[:2]
    side = max(8, int(min(h, w) * rng.uniform(0.6, 1.0)))
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = src[y0:y0 + side, x0:x0 + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if vflip and rng.random() < 0.5:
        crop = crop[::-1]
    im = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.Resampling.BICUBIC)
    f = np.asarray(im, dtype=np.float32)
    mean = f.mean()
    f = (f - mean) * rng.uniform(0.9, 1.1) + mean + rng.uniform(-12.0, 12.0)
    return np.clip(np.rint(f), 0, 255).astype(np.uint8)


DEFECT_KINDS = ("scratch", "crack", "hole", "contamination", "cut_paste", "color_shift", "blur")
_KIND_P = (0.2, 0.18, 0.17, 0.17, 0.16, 0.06, 0.06)  # colour shift and blur are a minority, as in real lines
MIN_AREA, MAX_AREA = 0.005, 0.08  # defect area as a fraction of the image: visible, yet local
_MIN_CHANGE = {"blur": 12.0, "cut_paste": 22.0}  # mean per-pixel change (0-255) a defect must make; default 28


def _lines(size: int, paths: list[list[np.ndarray]], widths: list[int]) -> np.ndarray:
    im = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(im)
    for pts, w in zip(paths, widths):
        draw.line([(float(p[0]), float(p[1])) for p in pts], fill=255, width=int(w), joint="curve")
    return np.asarray(im) > 0


def _walk(rng: np.random.Generator, start: np.ndarray, heading: float, n: int, step: float,
          jitter: float) -> list[np.ndarray]:
    pts = [np.asarray(start, dtype=float)]
    for _ in range(n):
        heading += rng.normal(0.0, jitter)
        pts.append(pts[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
    return pts


def _blob(rng: np.random.Generator, size: int, frac: float) -> np.ndarray:
    """An irregular, hole-free blob of about ``frac`` of the image: thresholded smooth noise under a radial cap."""
    b = int(np.clip(np.sqrt(frac) * size * 1.8, 6, size))
    yy, xx = np.mgrid[:b, :b]
    r2 = ((yy - (b - 1) / 2) ** 2 + (xx - (b - 1) / 2) ** 2) / (b / 2) ** 2
    field = ndimage.gaussian_filter(rng.standard_normal((b, b)), b / 8)
    field = field / (field.std() + 1e-9) - 2.5 * r2
    k = int(min(frac * size * size, 0.6 * b * b))
    m = field >= np.sort(field.ravel())[-max(k, 1)]
    lab, n = ndimage.label(m)
    if n > 1:
        m = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    m = ndimage.binary_fill_holes(m)
    out = np.zeros((size, size), dtype=bool)
    y0, x0 = rng.integers(0, size - b + 1, 2)
    out[y0:y0 + b, x0:x0 + b] = m
    return out


def _tone(img: np.ndarray, m: np.ndarray, rng: np.random.Generator) -> float:
    """A grey level that contrasts with the surface under ``m``: dark on bright parts, bright on dark ones."""
    return rng.uniform(10, 50) if img[m].mean() > 128 else rng.uniform(205, 250)


def _scratch(img, rng, size, foreign):
    w = max(2, round(size * rng.uniform(0.012, 0.022)))
    n = int(rng.integers(3, 7))
    pts = _walk(rng, rng.uniform(0.15, 0.85, 2) * size, rng.uniform(0, 2 * np.pi), n,
                size * rng.uniform(0.35, 0.7) / n, 0.35)
    m = _lines(size, [pts], [w])
    return img * 0.1 + _tone(img, m, rng) * 0.9, m


def _crack(img, rng, size, foreign):
    w = max(2, round(size * rng.uniform(0.01, 0.016)))
    step, heading = size * rng.uniform(0.03, 0.05), rng.uniform(0, 2 * np.pi)
    main = _walk(rng, rng.uniform(0.2, 0.8, 2) * size, heading, int(rng.integers(8, 15)), step, 0.6)
    paths, widths = [main], [w]
    for _ in range(int(rng.integers(1, 4))):  # branches leave the main line at an angle, thinner
        at = main[int(rng.integers(1, len(main) - 1))]
        turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.2)
        paths.append(_walk(rng, at, heading + turn, int(rng.integers(3, 7)), step * 0.8, 0.6))
        widths.append(max(1, w - 1))
    m = _lines(size, paths, widths)
    return img * rng.uniform(0.12, 0.3), m


def _hole(img, rng, size, foreign):
    a = size * rng.uniform(0.05, 0.11)
    b, t = a * rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)
    cy, cx = rng.uniform(a + 3, size - a - 3, 2)
    yy, xx = np.mgrid[:size, :size].astype(float)
    u, v = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t), -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
    inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    rim_w = max(2.0, round(min(a, b) * 0.3))
    dist = ndimage.distance_transform_edt(~inside)
    m = dist <= rim_w  # the ellipse plus its soft rim
    alpha = np.where(inside, 1.0, 1.0 - 0.6 * dist / rim_w)[..., None]
    shade = rng.uniform(8, 30) + 18 * np.clip(u / a, -1, 1)  # lit from one side, like a real cavity
    return img * (1 - alpha) + shade[..., None] * alpha, m


def _contamination(img, rng, size, foreign):
    m = _blob(rng, size, rng.uniform(0.008, 0.045))
    if rng.random() < 0.5:  # a foreign colour, as far as possible from the surface, with some texture
        cands = rng.uniform(0, 255, (8, 3))
        colour = cands[np.argmax(np.abs(cands - img[m].mean(0)).sum(1))]
        noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), 2.0)
        tex = colour * (1 + 0.6 * noise[..., None])
    else:  # a foreign material: another photograph seen through the blob
        tex = foreign.astype(np.float32)
    alpha = rng.uniform(0.7, 0.92)
    return img * (1 - alpha) + tex * alpha, m


def _cut_paste(img, rng, size, foreign):
    src = img if rng.random() < 0.5 else foreign
    ph, pw = (size * rng.uniform(0.1, 0.2, 2)).astype(int)
    y, x = int(rng.integers(0, size - ph + 1)), int(rng.integers(0, size - pw + 1))
    angle = float(rng.uniform(0, 360)) if rng.random() < 0.7 else 0.0
    patch = np.asarray(Image.fromarray(np.ascontiguousarray(src[y:y + ph, x:x + pw])).rotate(
        angle, resample=Image.Resampling.BILINEAR, expand=True))
    fp = np.asarray(Image.new("L", (int(pw), int(ph)), 255).rotate(
        angle, resample=Image.Resampling.BILINEAR, expand=True)) == 255  # only pixels fully inside the patch
    hh, ww = fp.shape
    if hh >= size or ww >= size:
        return None
    ty, tx = int(rng.integers(0, size - hh + 1)), int(rng.integers(0, size - ww + 1))
    m = np.zeros((size, size), dtype=bool)
    m[ty:ty + hh, tx:tx + ww] = fp
    f = img.astype(np.float32)
    f[ty:ty + hh, tx:tx + ww][fp] = patch[fp]
    return f, m


def _color_shift(img, rng, size, foreign):
    m = _blob(rng, size, rng.uniform(0.01, 0.06))
    gains = 1 + rng.uniform(-0.3, 0.3, 3)
    gains[int(rng.integers(3))] = 1 + rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 0.7)
    return img * gains + rng.uniform(-25, 25, 3), m


def _blur(img, rng, size, foreign):
    m = _blob(rng, size, rng.uniform(0.015, 0.06))
    s = size * rng.uniform(0.015, 0.03)
    return ndimage.gaussian_filter(img.astype(np.float32), (s, s, 0)), m


_DRAW = {"scratch": _scratch, "crack": _crack, "hole": _hole, "contamination": _contamination,
         "cut_paste": _cut_paste, "color_shift": _color_shift, "blur": _blur}


def apply_defect(img: np.ndarray, rng: np.random.Generator, kind: str | None = None,
                 foreign: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(defective image, bool mask, kind). Pixels outside the mask are untouched; the mask covers MIN_AREA..MAX_AREA
    of the image and >= 90% of its pixels changed visibly, else the defect is redrawn elsewhere (a kind that cannot
    be made visible on this image falls back to a foreign-colour contamination)."""
    size = img.shape[0]
    kind = kind or str(rng.choice(DEFECT_KINDS, p=_KIND_P))
    foreign = img[::-1, ::-1] if foreign is None else foreign
    for k in dict.fromkeys((kind, "contamination")):
        for _ in range(40):
            res = _DRAW[k](img, rng, size, foreign)
            if res is None or not MIN_AREA <= res[1].mean() <= MAX_AREA:
                continue
            f, m = res
            out = np.where(m[..., None], np.clip(np.rint(f), 0, 255).astype(np.uint8), img)
            change = np.abs(out.astype(np.int16) - img).max(2)[m]
            if change.mean() >= _MIN_CHANGE.get(k, 28.0) and (change > 0).mean() >= 0.9:
                return out, m, k
    raise RuntimeError(f"could not draw a visible {kind} defect on a {size}px image")


def _sample_rng(seed: int, category: str, role: int, index: int) -> np.random.Generator:
    """Independent stream per (seed, category, role, index): adding a category never changes the others."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(category.encode()), role, index]))


def _foreign_view(rng: np.random.Generator, size: int) -> np.ndarray:
    return sample_view(load_source(FOREIGN_SOURCES[int(rng.integers(len(FOREIGN_SOURCES)))]), rng, size)


def make_sample(category: str, seed: int, role: int, index: int, size: int,
                defect: bool) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(image, mask or None, defect kind or 'good') for one sample; pure function of its arguments."""
    rng = _sample_rng(seed, category, role, index)
    img = sample_view(load_source(category), rng, size, vflip=category in _ORIENTATION_FREE)
    if not defect:
        return img, None, "good"
    return apply_defect(img, rng, foreign=_foreign_view(rng, size))


def _save_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")


def _prepare_out(out: Path) -> None:
    """Refuse to clobber a folder we did not write; replace one we did (it has our META_FILE)."""
    if out.exists():
        if not out.is_dir():
            raise DatasetError(f"synth output {out} exists and is not a directory: choose another --out")
        if any(out.iterdir()) and not (out / META_FILE).is_file():
            raise DatasetError(f"synth output {out} is a non-empty folder not written by synth: choose an empty or "
                               f"new folder")


def synthesize(out_dir: str | os.PathLike[str], layout: str = "mvtec", seed: int = 0, n_train: int = 10,
               n_test_good: int = 4, n_test_bad: int = 8, image_size: int = 224,
               categories: Sequence[str] | None = None) -> Path:
    """Write a synthetic dataset in ``layout`` ("mvtec" or "visa") under ``out_dir`` and return its path.

    Same arguments → byte-identical files. The folder is built beside ``out_dir`` and moved into place at the end,
    so an interrupted run never leaves a half dataset that a later reader would take for a whole one.
    """
    if layout not in ("mvtec", "visa"):
        raise ValueError(f"unknown synth layout {layout!r}: use 'mvtec' or 'visa'")
    if image_size < 32:
        raise ValueError(f"image_size {image_size} is too small for visible defects: use 32 or more")
    if min(n_train, n_test_good, n_test_bad) < 0 or n_train + n_test_good + n_test_bad == 0:
        raise ValueError("image counts must be non-negative and not all zero")
    cats = list(dict.fromkeys(categories if categories is not None else
                              (MVTEC_CATEGORIES if layout == "mvtec" else VISA_CATEGORIES)))
    unknown = [c for c in cats if c not in SOURCES]
    if unknown or not cats:
        raise ValueError(f"unknown synth categories {unknown}; available: {', '.join(SOURCES)}")
    out = Path(os.path.expanduser(os.fspath(out_dir))).absolute()
    _prepare_out(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        width = max(3, len(str(max(n_train + n_test_good, n_test_bad, 1) - 1)))
        kinds: dict[str, str] = {}
        rows: list[str] = []
        for cat in cats:
            counters: dict[str, int] = {}
            plan = [("train", 0, i, False) for i in range(n_train)]
            plan += [("test", 1, i, False) for i in range(n_test_good)]
            plan += [("test", 2, i, True) for i in range(n_test_bad)]
            for split, role, i, bad in plan:
                img, mask, kind = make_sample(cat, seed, role, i, image_size, bad)
                if layout == "mvtec":
                    folder = kind if split == "test" else "good"
                    n = counters[f"{split}/{folder}"] = counters.get(f"{split}/{folder}", -1) + 1
                    rel = f"{cat}/{split}/{folder}/{n:0{width}d}.png"
                    mask_rel = f"{cat}/ground_truth/{kind}/{n:0{width}d}_mask.png" if bad else ""
                else:
                    folder = "Anomaly" if bad else "Normal"
                    n = counters[folder] = counters.get(folder, -1) + 1
                    rel = f"{cat}/Data/Images/{folder}/{n:0{width}d}.png"
                    mask_rel = f"{cat}/Data/Masks/Anomaly/{n:0{width}d}.png" if bad else ""
                    rows.append(f"{cat},{split},{'anomaly' if bad else 'normal'},{rel},{mask_rel}")
                _save_png(img, tmp / rel)
                if bad:
                    assert mask is not None
                    _save_png(mask.astype(np.uint8) * 255, tmp / mask_rel)
                    kinds[rel] = kind
        if layout == "visa":
            (tmp / "split_csv").mkdir()
            (tmp / "split_csv" / "1cls.csv").write_text("object,split,label,image,mask\n" + "\n".join(rows) + "\n")
        meta = {"generator": "spg_dist.data.synth", "layout": layout, "seed": int(seed), "image_size": image_size,
                "categories": cats, "n_train": n_train, "n_test_good": n_test_good, "n_test_bad": n_test_bad,
                "defect_kinds": list(DEFECT_KINDS), "defects": kinds}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
