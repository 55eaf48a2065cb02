"""VisA layout reader: the split is defined by ``<root>/split_csv/1cls.csv``, not by folders.

Columns ``object,split,label,image,mask``; paths relative to the root; ``label`` is ``normal``/``anomaly``;
``mask`` is empty for normal images. 1cls.csv does not name defect types, so anomalies get ``"anomaly"``.

Every path of the CSV is confined to the root (:func:`~spg_dist.data.records.path_in_root`). A row whose image
leaves it (``../../x.png``, ``/elsewhere/x.png``) is still listed, as ``<dataset>/outside-root/<digest>`` with the
URI ``outside-root:<path as written>`` and ``extra["refused"]``: extraction records it as an ``errors`` row (stage
``path``) and never opens the file. A mask that leaves the root gets the same URI and ``extra["refused_mask"]``;
its image is still read and the mask becomes an ``errors`` row (stage ``mask``), like a missing mask.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Iterator

from spg_dist.data.imageio import check_dataset_root
from spg_dist.data.records import (ANOMALOUS, NORMAL, OUTSIDE_ROOT_DIR, DatasetError, ImageRecord,
                                   outside_root_message, outside_root_uri, path_in_root, printable)

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


def read_visa(root: str | os.PathLike[str], dataset: str | None = None) -> Iterator[ImageRecord]:
    """Yield every row of ``split_csv/1cls.csv`` as a record, sorted by ``image_id``."""
    csv_p = visa_csv_path(root)
    root_p = csv_p.parent.parent
    name = dataset or root_p.name
    real_root = os.path.realpath(root_p)  # once: absolute CSV paths may name the root through its real path
    records: list[ImageRecord] = []
    with open(csv_p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in VISA_COLUMNS if c not in header]
        if missing:
            found = printable(", ".join(header)) or "none"
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
            extra: dict = {"csv_line": line}
            raw = vals["image"].replace("\\", "/")
            rel = path_in_root(root_p, raw, real_root)
            if rel is None:  # never opened, never stat'ed: listed so that the run reports it
                digest = hashlib.sha1(raw.encode("utf-8", "surrogateescape")).hexdigest()[:12]
                image_id = f"{name}/{OUTSIDE_ROOT_DIR}/{digest}"  # stable across CSV edits, reveals nothing
                image_uri = outside_root_uri(raw)
                extra["refused"] = outside_root_message("image", raw)
            elif rel.name in ("", ".", ".."):
                raise DatasetError(f"{csv_p}:{line}: image path {vals['image']!r} names the dataset root, not an "
                                   f"image file; fix the row")
            else:
                image_id, image_uri = f"{name}/{rel.with_suffix('').as_posix()}", str(root_p / rel)
            mask_uri = ""
            if vals["mask"] and label == ANOMALOUS:
                raw_mask = vals["mask"].replace("\\", "/")
                mrel = path_in_root(root_p, raw_mask, real_root)
                if mrel is None:
                    mask_uri = outside_root_uri(raw_mask)
                    extra["refused_mask"] = outside_root_message("mask", raw_mask)
                else:
                    mask_uri = str(root_p / mrel)
            records.append(ImageRecord(
                image_id=image_id, dataset=name, category=vals["object"], split=split, label=label,
                defect_type="good" if label == NORMAL else "anomaly", image_uri=image_uri, mask_uri=mask_uri,
                extra=extra))
    records.sort(key=lambda r: r.image_id)
    yield from records
