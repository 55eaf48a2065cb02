"""MVTec AD layout reader.

``<root>/<cat>/train/good/*.png`` and ``<root>/<cat>/test/<defect>/*.png``; masks at
``<root>/<cat>/ground_truth/<defect>/<stem>_mask.png``. An anomalous image without its mask is still listed
(``mask_uri=""``, the expected path kept in ``extra["expected_mask"]``) so the pipeline records it as an error
instead of silently scoring it without pixel ground truth.

Every path comes from listing the root, so none can leave it by name; symlinks inside the tree are followed (see
:mod:`spg_dist.data.records`). File names are data: a stem with glob characters (``*``, ``[``) matches only its
own mask, never another image's.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterator

from spg_dist.data.imageio import check_dataset_root, is_image_file
from spg_dist.data.records import ANOMALOUS, NORMAL, ImageRecord

SPLITS = ("train", "test")


def _sorted_dirs(p: Path) -> list[Path]:
    return sorted((c for c in p.iterdir() if c.is_dir() and not c.name.startswith(".")), key=lambda c: c.name)


def mvtec_categories(root: Path) -> list[str]:
    """Sub-folders of ``root`` that look like MVTec categories (hold ``train/`` or ``test/``)."""
    return [c.name for c in _sorted_dirs(root) if any((c / s).is_dir() for s in SPLITS)]


def _find_mask(gt_dir: Path, stem: str) -> Path | None:
    exact = gt_dir / f"{stem}_mask.png"
    if exact.is_file():
        return exact
    if gt_dir.is_dir():  # same stem, another raster extension (e.g. a re-encoded copy of the dataset)
        for cand in sorted(gt_dir.glob(f"{glob.escape(stem)}_mask.*")):
            if is_image_file(cand):
                return cand
    return None


def read_mvtec(root: str | os.PathLike[str], dataset: str | None = None) -> Iterator[ImageRecord]:
    """Yield every image of an MVTec-AD-style dataset, sorted by ``image_id``."""
    root_p = check_dataset_root(root, "mvtec")
    name = dataset or root_p.name
    records: list[ImageRecord] = []
    for cat in mvtec_categories(root_p):
        for split in SPLITS:
            split_dir = root_p / cat / split
            if not split_dir.is_dir():
                continue
            for defect_dir in _sorted_dirs(split_dir):
                defect = defect_dir.name
                label = NORMAL if defect == "good" else ANOMALOUS
                for f in sorted(defect_dir.iterdir(), key=lambda c: c.name):
                    if not (f.is_file() and is_image_file(f)) or f.stem.endswith("_mask"):
                        continue
                    rel = f.relative_to(root_p).with_suffix("").as_posix()
                    mask_uri, extra = "", {}
                    if label == ANOMALOUS:
                        gt_dir = root_p / cat / "ground_truth" / defect
                        mask = _find_mask(gt_dir, f.stem)
                        if mask is not None:
                            mask_uri = str(mask)
                        else:
                            extra = {"expected_mask": str(gt_dir / f"{f.stem}_mask.png")}
                    records.append(ImageRecord(
                        image_id=f"{name}/{rel}", dataset=name, category=cat, split=split, label=label,
                        defect_type=defect, image_uri=str(f), mask_uri=mask_uri, extra=extra))
    records.sort(key=lambda r: r.image_id)
    yield from records
