"""Plain-folder reader: any tree of images, with labels inferred from folder names and optional masks.

Rules (kept few so that a user can predict them):
- every png/jpg/jpeg/bmp/tif/tiff under the root is an image, except files named ``*_mask.*`` and anything inside
  a ``masks/`` or ``ground_truth/`` folder, which are masks;
- category = first-level sub-folder (the root's own name for images at the top); split = ``train`` if a folder on
  the path is called ``train``, else ``test``;
- label 0 if a folder on the path is called ``good``; 1 if the image has a mask (defect type = its parent
  folder); otherwise -1 (unknown, usable for fitting or scoring but not for metrics);
- a mask matches an image by stem: ``<stem>_mask.*`` beside the image, or ``<stem>_mask.*``/``<stem>.*`` inside a
  mask folder anywhere under the root; when several mask-folder files share a stem, the one whose folders best
  match the image's folders wins, and a tie is left unmatched (``extra["ambiguous_masks"]``) rather than guessed.

Every path comes from walking the root, so none leaves it by name; symlinked folders and files inside the tree are
followed on purpose (datasets are often assembled from symlinks; see :mod:`spg_dist.data.records`). Entries that
are not regular files (a FIFO or device named ``*.png``) are listed but refused when read, never opened.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Iterator

from spg_dist.data.imageio import check_dataset_root, is_image_file
from spg_dist.data.records import ANOMALOUS, NORMAL, UNKNOWN, ImageRecord

MASK_DIRS = frozenset({"masks", "ground_truth"})


def _mask_key(stem: str) -> str:
    return stem[: -len("_mask")] if stem.endswith("_mask") else stem


def _common(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    """Shared leading plus shared trailing folders: how alike two folder paths are."""
    pre = 0
    while pre < min(len(a), len(b)) and a[pre] == b[pre]:
        pre += 1
    suf = 0
    while suf < min(len(a), len(b)) - pre and a[-1 - suf] == b[-1 - suf]:
        suf += 1
    return pre + suf


def _walk(root: Path) -> tuple[list[PurePosixPath], dict[str, list[PurePosixPath]], dict[str, list[PurePosixPath]]]:
    """(images, beside-masks by key, mask-folder masks by key), all as paths relative to ``root``."""
    images: list[PurePosixPath] = []
    beside: dict[str, list[PurePosixPath]] = {}
    in_dirs: dict[str, list[PurePosixPath]] = {}
    seen: set[str] = set()
    for cur, dirs, files in os.walk(root, followlinks=True):  # datasets are often assembled from symlinks
        real = os.path.realpath(cur)
        if real in seen:  # a symlink loop, or the same folder linked twice: read it once
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_dir = PurePosixPath(Path(cur).relative_to(root).as_posix())
        inside_mask_dir = any(p.lower() in MASK_DIRS for p in rel_dir.parts)
        for fn in sorted(files):
            if not is_image_file(fn):
                continue
            rel = rel_dir / fn
            if inside_mask_dir:
                in_dirs.setdefault(_mask_key(rel.stem), []).append(rel)
            elif rel.stem.endswith("_mask"):
                beside.setdefault(f"{rel_dir.as_posix()}/{_mask_key(rel.stem)}", []).append(rel)
            else:
                images.append(rel)
    return images, beside, in_dirs


def _match_mask(rel: PurePosixPath, beside: dict[str, list[PurePosixPath]],
                in_dirs: dict[str, list[PurePosixPath]]) -> tuple[PurePosixPath | None, list[PurePosixPath]]:
    """(mask, ambiguous candidates) for one image."""
    here = beside.get(f"{rel.parent.as_posix()}/{rel.stem}")
    if here:
        return sorted(here)[0], []
    cands = in_dirs.get(rel.stem, [])
    if len(cands) <= 1:
        return (cands[0] if cands else None), []
    img_dirs = rel.parent.parts
    scored = sorted(((_common(img_dirs, tuple(p for p in c.parent.parts if p.lower() not in MASK_DIRS)), c)
                     for c in cands), key=lambda t: (-t[0], str(t[1])))
    if scored[0][0] > scored[1][0]:
        return scored[0][1], []
    return None, [c for s, c in scored if s == scored[0][0]]


def read_folder(root: str | os.PathLike[str], dataset: str | None = None) -> Iterator[ImageRecord]:
    """Yield every image under ``root`` following the rules above, sorted by ``image_id``."""
    root_p = check_dataset_root(root, "folder")
    name = dataset or root_p.name
    images, beside, in_dirs = _walk(root_p)
    records: list[ImageRecord] = []
    for rel in images:
        dirs = rel.parent.parts
        category = dirs[0] if dirs else root_p.name
        split = "train" if "train" in dirs else "test"
        mask_uri, extra = "", {}
        if "good" in dirs:
            label, defect = NORMAL, "good"
        else:
            mask, ambiguous = _match_mask(rel, beside, in_dirs)
            if mask is not None:
                label, defect, mask_uri = ANOMALOUS, (dirs[-1] if dirs else root_p.name), str(root_p / mask)
            else:
                label, defect = UNKNOWN, ""
                if ambiguous:
                    extra = {"ambiguous_masks": [str(root_p / c) for c in ambiguous]}
        records.append(ImageRecord(
            image_id=f"{name}/{rel.with_suffix('').as_posix()}", dataset=name, category=category, split=split,
            label=label, defect_type=defect, image_uri=str(root_p / rel), mask_uri=mask_uri, extra=extra))
    records.sort(key=lambda r: r.image_id)
    yield from records
