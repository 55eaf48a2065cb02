"""Patch-level anomaly detectors operating on stored patch tokens [N, h, w, d]."""

from spg_dist.detectors.base import Detector, image_score, l2_normalize, to_tensor
from spg_dist.detectors.knn import KNNDetector
from spg_dist.detectors.musc import MuScDetector

__all__ = ["Detector", "image_score", "l2_normalize", "to_tensor", "KNNDetector", "MuScDetector"]
