"""Typed image records: the one shape every dataset reader yields.

A record is metadata only (no pixels), so listing a dataset of 100k images is cheap and the records can be
shipped to Ray tasks as plain dicts. ``image_id`` is the stable key every table of the store uses: it is
``"<dataset>/<path relative to the dataset root, without extension>"``, so it survives re-listing, re-runs and
moving the dataset root.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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
    image_uri: str  # absolute path (or URL) of the image file
    mask_uri: str = ""  # absolute path of the binary mask, "" when there is none
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
