"""Evaluation metrics (no model code, no Ray): image AUROC/AP (sklearn), pixel AUROC (= sklearn), AUPRO (anomalib 2.7)."""

from .aupro import aupro, region_labels
from .pooling import Pooling, parse_pooling, pool
from .metrics import METRICS, evaluate_category, image_ap, image_auroc, mean_over_categories, pixel_auroc

__all__ = [
    "METRICS",
    "aupro",
    "evaluate_category",
    "image_ap",
    "image_auroc",
    "mean_over_categories",
    "pixel_auroc",
    "Pooling",
    "parse_pooling",
    "pool",
    "region_labels",
]
