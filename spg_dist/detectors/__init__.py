"""Anomaly detectors on stored patch tokens, behind one interface and one registry (pure PyTorch/NumPy).

``create_detector(name, **settings)`` builds any registered detector; :class:`Detector` says what each reads
(:class:`Inputs`), how it is fitted (:class:`FitData`) and scored (:class:`TokenSet` -> patch scores). Built in:
``spg`` (SPG guides over an SAE), ``knn`` (AnomalyDINO-style few-shot), ``musc`` (label-free, transductive),
``lake`` (channel-variance deviation, few-shot), ``foundad`` (a corrupted->clean token projector, few-shot) and
``visualad`` (learnable tokens inside a frozen ViT, zero-shot). ``spg_dist.stages.detect`` runs any of them on a
store with the one evaluation loop.
"""

from spg_dist.detectors.base import (Detector, DetectorConfigError, FitData, Inputs, TokenSet, image_score,
                                     l2_normalize, settings_from, to_tensor)
from spg_dist.detectors.registry import (UnknownDetectorError, create_detector, get_detector_class,
                                         list_detectors, register_detector)


def __getattr__(name: str):  # the classes themselves, imported on first use (their modules pull in torch models)
    lazy = {"KNNDetector": "knn", "MuScDetector": "musc", "LAKEDetector": "lake", "SPGDetector": "spg",
            "FoundADDetector": "foundad", "VisualADDetector": "visualad"}
    if name in lazy:
        return get_detector_class(lazy[name])
    raise AttributeError(name)


__all__ = ["Detector", "DetectorConfigError", "FitData", "Inputs", "TokenSet", "UnknownDetectorError",
           "create_detector", "get_detector_class", "image_score", "l2_normalize", "list_detectors",
           "register_detector", "settings_from", "to_tensor"]
