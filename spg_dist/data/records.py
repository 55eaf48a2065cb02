"""Typed image records: the one shape every dataset reader yields.

A record is metadata only (no pixels), so listing a dataset of 100k images is cheap and the records can be
shipped to Ray tasks as plain dicts. ``image_id`` is the stable key every table of the store uses: it is
``"<dataset>/<path relative to the dataset root, without extension>"``, so it survives re-listing, re-runs and
moving the dataset root.

Paths named *inside* a dataset file (VisA's ``split_csv/1cls.csv``) are data, not trusted filesystem structure:
:func:`path_in_root` confines them to the dataset root. One that leaves the root (``../..``, an absolute path
elsewhere) is still listed, so the run reports it, but its URI becomes ``outside-root:<the path as written>``: a
pseudo-URI that every loader of :mod:`spg_dist.data.imageio` refuses without touching the filesystem, so the file
is never opened, not even stat'ed, and the message (:func:`outside_root_message`) is the same whether or not the
outside path exists. The check is lexical on purpose: symlinks that are part of the dataset tree are followed.
A symlink is filesystem structure put there by whoever assembled the dataset, not text anyone can write into a
CSV, and datasets are often assembled from symlinks into shared storage; refusing them would break those. The
same holds for the MVTec and plain-folder layouts, whose paths all come from listing the root.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from spg_dist.errors import SpgError

NORMAL, ANOMALOUS, UNKNOWN = 0, 1, -1


@dataclass(frozen=True)
class ImageRecord:
    image_id: str
    dataset: str
    category: str
    split: str  # "train" | "test"
    label: int  # 0 normal, 1 anomalous, -1 unknown
    defect_type: str  # "good" for normal images; "" when the layout does not say
    image_uri: str  # absolute path (or URL) of the image file; "outside-root:<path>" when refused (see above)
    mask_uri: str = ""  # absolute path of the binary mask, "" when there is none; "outside-root:<path>" if refused
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageRecord":
        keys = ("image_id", "dataset", "category", "split", "label", "defect_type", "image_uri", "mask_uri")
        return cls(**{k: d[k] for k in keys if k in d})


class DatasetError(SpgError, ValueError):
    """A dataset path or layout that cannot be read; the message is one line saying what to do."""


OUTSIDE_ROOT_SCHEME = "outside-root:"  # image_uri/mask_uri of a dataset-file path that leaves the root
OUTSIDE_ROOT_DIR = "outside-root"  # image ids of such records: <dataset>/outside-root/<digest of the path>


def printable(text: str) -> str:
    """``text`` itself when it prints on one line, else its ``repr`` (a path with a newline never splits a message)."""
    return text if text.isprintable() else repr(text)


def outside_root_uri(raw: str) -> str:
    """The pseudo-URI that stands for a refused path: the loaders refuse it without opening anything."""
    return OUTSIDE_ROOT_SCHEME + raw


def outside_root_path(uri: str) -> str | None:
    """The path as written in the dataset file when ``uri`` is a refused one, else None."""
    s = os.fspath(uri)
    return s[len(OUTSIDE_ROOT_SCHEME):] if s.startswith(OUTSIDE_ROOT_SCHEME) else None


def outside_root_message(what: str, raw: str) -> str:
    """One line for a refused path; it never depends on whether the outside file exists (nothing is looked up)."""
    return f"{what} path outside the dataset root, not read: {printable(raw)}"


def path_in_root(root: Path, raw: str, real_root: str | None = None) -> PurePosixPath | None:
    """``raw`` (a path written in a dataset file) normalised and relative to ``root``, or None when it leaves it.

    Lexical only, nothing on disk is consulted apart from ``root`` itself: a relative path must not climb out with
    ``..`` (after normalising ``a/../b``), an absolute one must lie under ``root`` or under its real path
    ``real_root`` (a root reached through a symlink). Backslashes count as separators (CSVs written on Windows).
    Returns ``PurePosixPath(".")`` for the root itself.
    """
    s = raw.strip().replace("\\", "/")
    norm = posixpath.normpath(s) if s else "."
    if norm.startswith("/"):
        for base in (root.as_posix(), real_root or os.path.realpath(root)):
            b = posixpath.normpath(base)
            if norm == b:
                return PurePosixPath(".")
            prefix = b.rstrip("/") + "/"
            if norm.startswith(prefix):
                return PurePosixPath(norm[len(prefix):])
        return None
    if norm == ".." or norm.startswith("../"):
        return None
    return PurePosixPath(norm)
