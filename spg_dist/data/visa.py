"""VisA layout reader: the split is defined by ``<root>/split_csv/1cls.csv``, not by folders.

Columns ``object,split,label,image,mask``; paths relative to the root; ``label`` is ``normal``/``anomaly``;
``mask`` is empty for normal images. 1cls.csv does not name defect types, so anomalies get ``"anomaly"``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path, PurePosixPath
from typing import Iterator

from spg_dist.data.imageio import check_dataset_root
from spg_dist.data.records import ANOMALOUS, NORMAL, DatasetError, ImageRecord

VISA_CSV = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": NORMAL, "anomaly": ANOMALOUS}
_SPLITS = ("train", "test")


def visa_csv_path(root: str | os.PathLike[str]) -> Path:
    """The split file of a VisA root, or a ``DatasetError`` saying which root to pass instead."""
    root_p = check_dataset_root(root, "visa")
    csv_p = root_p / VISA_CSV
    if not csv_p.is_file():
        raise DatasetError(f"VisA root {root_p} has no {VISA_CSV.as_posix()}: pass the VisA folder that holds "
                           f"split_csv/ (or use folder:{root_p} for a plain image folder)")
    return csv_p


def _rel_id(root: Path, rel: str) -> tuple[str, Path]:
    """(id path without extension, absolute path) for a CSV path; tolerant of Windows separators."""
    rel = rel.strip().replace("\\", "/")
    p = PurePosixPath(rel)
    if p.is_absolute():
        abs_p = Path(rel)
        try:
            p = PurePosixPath(abs_p.relative_to(root).as_posix())
        except ValueError:
            p = PurePosixPath(rel.lstrip("/"))
        return p.with_suffix("").as_posix(), abs_p
    return p.with_suffix("").as_posix(), root / p


def read_visa(root: str | os.PathLike[str], dataset: str | None = None) -> Iterator[ImageRecord]:
    """Yield every row of ``split_csv/1cls.csv`` as a record, sorted by ``image_id``."""
    csv_p = visa_csv_path(root)
    root_p = csv_p.parent.parent
    name = dataset or root_p.name
    records: list[ImageRecord] = []
    with open(csv_p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in VISA_COLUMNS if c not in header]
        if missing:
            found = ", ".join(header) or "none"
            raise DatasetError(f"{csv_p}: missing column(s) {', '.join(missing)} (found: {found}); "
                               f"expected header {','.join(VISA_COLUMNS)}")
        reader.fieldnames = header
        for line, row in enumerate(reader, start=2):
            vals = {k: (row.get(k) or "").strip() for k in VISA_COLUMNS}
            if not any(vals.values()):
                continue  # blank line
            label = _LABELS.get(vals["label"].lower())
            if label is None:
                raise DatasetError(f"{csv_p}:{line}: label {vals['label']!r} is neither 'normal' nor 'anomaly'; "
                                   f"fix the row")
            split = vals["split"].lower()
            if split not in _SPLITS:
                raise DatasetError(f"{csv_p}:{line}: split {vals['split']!r} is neither 'train' nor 'test'; "
                                   f"fix the row")
            if not vals["image"] or not vals["object"]:
                raise DatasetError(f"{csv_p}:{line}: empty object or image column; fix the row")
            rel_id, img = _rel_id(root_p, vals["image"])
            mask_uri = str(_rel_id(root_p, vals["mask"])[1]) if vals["mask"] and label == ANOMALOUS else ""
            records.append(ImageRecord(
                image_id=f"{name}/{rel_id}", dataset=name, category=vals["object"], split=split, label=label,
                defect_type="good" if label == NORMAL else "anomaly", image_uri=str(img), mask_uri=mask_uri,
                extra={"csv_line": line}))
    records.sort(key=lambda r: r.image_id)
    yield from records
