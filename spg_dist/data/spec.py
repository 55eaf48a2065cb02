"""Dataset specs (``mvtec:PATH``, ``visa:PATH``, ``folder:PATH``, optionally ``@NAME``) and record listing.

This is the one entry the CLI and the Ray pipelines use: it validates everything that can be checked before any
pixel is read, and fails with a single line naming the path and what to do, so a typo never costs a cluster job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from spg_dist.data.folder import read_folder
from spg_dist.data.imageio import check_dataset_root
from spg_dist.data.mvtec import read_mvtec
from spg_dist.data.records import (ANOMALOUS, DatasetError, ImageRecord, outside_root_message, outside_root_path,
                                   printable)
from spg_dist.data.visa import read_visa, visa_csv_path

Reader = Callable[[Path, str], Iterator[ImageRecord]]
READERS: dict[str, Reader] = {"mvtec": read_mvtec, "visa": read_visa, "folder": read_folder}
LAYOUT_HINT = {
    "mvtec": "<root>/<category>/train/good/*.png and <root>/<category>/test/<defect>/*.png",
    "visa": "rows in <root>/split_csv/1cls.csv pointing at image files",
    "folder": "png/jpg/jpeg/bmp/tif/tiff files anywhere under <root>",
}
SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset spec: layout, absolute root, and the dataset name that prefixes every ``image_id``."""

    layout: str
    root: Path
    name: str

    def __str__(self) -> str:
        return f"{self.layout}:{self.root}@{self.name}"


def parse_dataset_spec(spec: str, name: str | None = None) -> DatasetSpec:
    """Parse ``LAYOUT:PATH[@NAME]``; ``name`` (e.g. a CLI option) overrides ``@NAME``, which overrides the root's
    basename. The root is checked now (exists, is a folder, VisA has its CSV) so errors surface before any work."""
    if not isinstance(spec, str) or ":" not in spec:
        raise DatasetError(f"dataset spec {spec!r} has no layout prefix: write mvtec:PATH, visa:PATH or folder:PATH")
    layout, _, rest = spec.partition(":")
    layout = layout.strip().lower()
    if layout not in READERS:
        raise DatasetError(f"unknown dataset layout {layout!r} in {spec!r}: use mvtec:PATH, visa:PATH or folder:PATH")
    path, at_name = rest, None
    if "@" in rest:  # a trailing @NAME, but not an '@' inside a folder name of the path
        head, _, tail = rest.rpartition("@")
        if tail and "/" not in tail and os.sep not in tail:
            path, at_name = head, tail
    if not path.strip():
        raise DatasetError(f"dataset spec {spec!r} has an empty path: write {layout}:PATH")
    root = check_dataset_root(path.strip(), layout)
    if layout == "visa":
        visa_csv_path(root)
    ds_name = (name or at_name or root.name).strip()
    if not ds_name or "/" in ds_name or ds_name in (".", ".."):
        raise DatasetError(f"bad dataset name {ds_name!r} for {root}: use a plain name without '/' "
                           f"(e.g. {layout}:PATH@mydata)")
    return DatasetSpec(layout=layout, root=root, name=ds_name)


def _as_list(values: Sequence[str] | str | None) -> list[str] | None:
    """Accept a list or a comma-separated string (as typed on a command line)."""
    if values is None:
        return None
    if isinstance(values, str):
        values = values.split(",")
    out = [v.strip() for v in values if v and v.strip()]
    return out or None


def list_records(spec: str | DatasetSpec, categories: Sequence[str] | str | None = None,
                 splits: Sequence[str] | str | None = None) -> list[ImageRecord]:
    """All records of a dataset, sorted by ``image_id``, optionally restricted to categories and splits."""
    ds = spec if isinstance(spec, DatasetSpec) else parse_dataset_spec(spec)
    records = list(READERS[ds.layout](ds.root, ds.name))
    if not records and ds.layout == "mvtec" and any((ds.root / s).is_dir() for s in SPLITS):
        raise DatasetError(f"{ds.root} looks like one MVTec category, not the dataset root: pass "
                           f"mvtec:{ds.root.parent} with categories={ds.root.name}")
    if not records:
        raise DatasetError(f"no images found in {ds.root} for layout {ds.layout}: expected {LAYOUT_HINT[ds.layout]}"
                           f"{'' if ds.layout == 'folder' else ' (or use folder:PATH)'}")
    seen: dict[str, str] = {}
    for r in records:
        if r.image_id in seen:
            raise DatasetError(f"two images share the id {r.image_id!r} in {ds.root}: {printable(seen[r.image_id])} "
                               f"and {printable(r.image_uri)}; rename one of them (or remove the repeated row)")
        seen[r.image_id] = r.image_uri
    cats, spl = _as_list(categories), _as_list(splits)
    if cats is not None:
        available = sorted({r.category for r in records})
        unknown = [c for c in cats if c not in available]
        if unknown:
            raise DatasetError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} in "
                               f"{ds.layout}:{ds.root}; available: {', '.join(available)}")
        records = [r for r in records if r.category in set(cats)]
    if spl is not None:
        bad = [s for s in spl if s not in SPLITS]
        if bad:
            raise DatasetError(f"unknown split(s) {', '.join(bad)} for {ds.root}: use train and/or test")
        kept = [r for r in records if r.split in set(spl)]
        if not kept:
            present = sorted({r.split for r in records})
            raise DatasetError(f"no {'/'.join(spl)} images in {ds.layout}:{ds.root} for the chosen categories; "
                               f"present splits: {', '.join(present)}")
        records = kept
    return records


def record_problems(record: ImageRecord, check_files: bool = True) -> str | None:
    """Why this record cannot be used as given (one line for an ``errors`` row), or None when it is fine.

    Listing never fails on a single bad image; this check lets the pipeline keep the rest and report the few.
    A path that a dataset file placed outside the dataset root is reported first, and never looked up on disk
    (so the answer does not depend on whether the outside file exists). File checks are existence only: sizes,
    pixel limits and empty masks are checked when the pixels are read (``decode_batch``).
    """
    for what, uri in (("image", record.image_uri), ("mask", record.mask_uri)):
        raw = outside_root_path(uri)
        if raw is not None:
            return outside_root_message(what, raw)
    if record.label == ANOMALOUS and not record.mask_uri:
        expected = record.extra.get("expected_mask")
        if expected:
            return f"anomalous image has no mask: expected {printable(str(expected))}"
        return f"anomalous image has no mask: {printable(record.image_uri)}"
    if record.extra.get("ambiguous_masks"):
        return (f"several masks match {printable(record.image_uri)} equally well: "
                f"{printable(', '.join(record.extra['ambiguous_masks']))}; rename or move them")
    if check_files:
        if not os.path.isfile(record.image_uri):
            return f"image file not found: {printable(record.image_uri)}"
        if record.mask_uri and not os.path.isfile(record.mask_uri):
            return f"mask file not found: {printable(record.mask_uri)}"
    return None


def problems(records: Iterable[ImageRecord], check_files: bool = True) -> dict[str, str]:
    """``{image_id: reason}`` for every record that ``record_problems`` rejects."""
    out = {}
    for r in records:
        why = record_problems(r, check_files)
        if why:
            out[r.image_id] = why
    return out
