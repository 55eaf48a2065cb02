"""The one table of detectors and the one factory (like the backbone registry): name -> class.

A new detector is a class with ``name``, ``summary``, ``Settings``, ``inputs``, ``fit`` and ``score``, registered
with :func:`register_detector`; ``spg detect --method NAME`` and ``spg demo --detectors all`` find it here. A
package can also declare detectors as entry points (group ``spg_dist.detectors``, ``name = "module:Class"``), so
the CLI finds them without an import. Detector modules are imported lazily (on first lookup) so
``import spg_dist.detectors`` stays cheap.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from spg_dist.detectors.base import Detector
from spg_dist.errors import UnknownNameError

# name -> "module:Class" of the built-in detectors, in the order listings show them
BUILTIN = {
    "spg": "spg_dist.detectors.spg:SPGDetector",
    "knn": "spg_dist.detectors.knn:KNNDetector",
    "musc": "spg_dist.detectors.musc:MuScDetector",
    "lake": "spg_dist.detectors.lake:LAKEDetector",
    "foundad": "spg_dist.detectors.foundad:FoundADDetector",
    "visualad": "spg_dist.detectors.visualad:VisualADDetector",
}
_REGISTRY: dict[str, type[Detector]] = {}
ENTRY_POINT_GROUP = "spg_dist.detectors"
_entry_points_loaded = False


class UnknownDetectorError(UnknownNameError):
    """A detector name that is not registered; the message lists the known ones."""


def register_detector(cls: type[Detector], overwrite: bool = False) -> type[Detector]:
    """Add ``cls`` under ``cls.name`` (usable as a class decorator); refuses silent replacement."""
    if not (isinstance(cls, type) and issubclass(cls, Detector)) or not cls.name:
        raise TypeError(f"{cls!r} is not a Detector subclass with a name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls and not overwrite:
        raise ValueError(f"detector {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_detector(name: str) -> None:
    """Remove a user-registered detector (built-in ones stay)."""
    if name in BUILTIN:
        raise ValueError(f"{name!r} is a built-in detector")
    _REGISTRY.pop(name, None)


def _load_entry_points() -> None:
    """Register the detectors other installed packages declare (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY and ep.name not in BUILTIN:
            register_detector(ep.load())


def list_detectors() -> list[str]:
    """Built-in names first (in their order), then user-registered ones."""
    _load_entry_points()
    return list(BUILTIN) + sorted(n for n in _REGISTRY if n not in BUILTIN)


def get_detector_class(name: str) -> type[Detector]:
    if name not in _REGISTRY and name in BUILTIN:
        module, _, cls = BUILTIN[name].partition(":")
        register_detector(getattr(importlib.import_module(module), cls))
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        known = list_detectors()
        close = difflib.get_close_matches(name, known, n=1)
        raise UnknownDetectorError(f"unknown detector {name!r}; {f'did you mean {close[0]!r}? ' if close else ''}"
                                   f"known: {', '.join(known)}")
    return _REGISTRY[name]


def create_detector(name: str, settings: Any = None, **params: Any) -> Detector:
    """An instance of detector ``name`` with its ``Settings`` (or ``params`` as ``--param`` strings/values)."""
    return get_detector_class(name)(settings, **params)


__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "UnknownDetectorError", "create_detector", "get_detector_class",
           "list_detectors", "register_detector", "unregister_detector"]
