"""Declarative plans (``configs/*.yaml``) resolved into trials: what ``spg sweep`` and ``spg reproduce`` run.

A sweep config is a grid over backbones, token layer and choice, SAE width/sparsity/sparsifier, token preprocessing,
guide settings, image pooling, transfer directions, seeds and detectors, plus Stage 1 settings and per-trial
resources. :func:`load_sweep` validates it strictly (an unknown key or a bad value is one line naming it, before any
work) and :meth:`SweepPlan.trials` expands it. Trials that share work are grouped: every SPG trial of one
(backbone, token, layer, preprocessing, auxiliary dataset, seed) shares one SAE data pass (all its (C, k, sparsifier)
cells train together), and every guide/pooling setting of an SAE reuses it. Pure Python: the Ray engine is
``spg_dist.ray.sweep``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from spg_dist.errors import SpgError

DIRECTION_SEP = "->"


class PlanError(SpgError, ValueError):
    """A plan (YAML) that cannot run as written; one line naming the key and what to write instead."""


def _strict(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise PlanError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        import difflib

        hints = [f"{u!r} (did you mean {difflib.get_close_matches(u, known, 1)[0]!r}?)"
                 if difflib.get_close_matches(u, known, 1) else repr(u) for u in unknown]
        raise PlanError(f"{where}: unknown key(s) {', '.join(hints)}; known: {', '.join(known)}")
    return dict(data)


def _list(value: Any, where: str, kind: type | tuple[type, ...] | None = None) -> list:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise PlanError(f"{where}: an empty list makes an empty grid; give at least one value")
    if kind is not None:
        for v in items:
            if isinstance(v, bool) and kind in (int, float) or not isinstance(v, kind):
                raise PlanError(f"{where}: {v!r} is not a {getattr(kind, '__name__', kind)}")
    return items


@dataclass(frozen=True)
class Direction:
    aux: str
    target: str

    @classmethod
    def parse(cls, text: str) -> "Direction":
        aux, sep, target = str(text).partition(DIRECTION_SEP)
        if not sep or not aux.strip() or not target.strip():
            raise PlanError(f"direction {text!r}: write AUX->TARGET, e.g. synth_visa->synth_mvtec")
        if aux.strip() == target.strip():
            raise PlanError(f"direction {text!r}: auxiliary and target are the same dataset (not zero-shot)")
        return cls(aux.strip(), target.strip())

    def __str__(self) -> str:
        return f"{self.aux} -> {self.target}"


@dataclass(frozen=True)
class Grid:
    backbone: tuple[str, ...] = ("texture-filterbank",)
    token: tuple[str, ...] = ("block",)
    layer: tuple[int, ...] = (-1,)
    C: tuple[int, ...] = (1024,)
    k: tuple[int, ...] = (16,)
    sparsifier: tuple[str, ...] = ("topk",)
    preprocess: tuple[str, ...] = ("none",)
    guides: tuple[dict, ...] = ({"preset": "paper"},)
    pooling: tuple[str, ...] = ("max",)
    direction: tuple[str, ...] = ()
    seed: tuple[int, ...] = (0,)
    detectors: tuple[str, ...] = ("spg",)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Grid":
        d = _strict(cls, data, "grid")
        types = {"backbone": str, "token": str, "layer": int, "C": int, "k": int, "sparsifier": str,
                 "preprocess": str, "guides": dict, "pooling": str, "direction": str, "seed": int, "detectors": str}
        out = {key: tuple(_list(value, f"grid.{key}", types[key])) for key, value in d.items()}
        grid = cls(**out)
        grid.validate()
        return grid

    def validate(self) -> None:
        from spg_dist.backbones import TOKEN_CHOICES, get_config
        from spg_dist.detectors import get_detector_class
        from spg_dist.evaluation import parse_pooling
        from spg_dist.guides import GuideConfig
        from spg_dist.sae.config import SPARSIFIERS
        from spg_dist.sae.preprocess import parse_steps

        if not self.direction:
            raise PlanError("grid.direction: give at least one AUX->TARGET direction")
        for d in self.direction:
            Direction.parse(d)
        for b in self.backbone:
            get_config(b.split("@")[0].split("+")[0])  # unknown backbone -> one line listing the known ones
        for t in self.token:
            if t not in TOKEN_CHOICES:
                raise PlanError(f"grid.token: {t!r} is not one of {', '.join(TOKEN_CHOICES)}")
        for s in self.sparsifier:
            if s not in SPARSIFIERS:
                raise PlanError(f"grid.sparsifier: {s!r} is not one of {', '.join(SPARSIFIERS)}")
        for C, k in itertools.product(self.C, self.k):
            if not 0 < k < C:
                raise PlanError(f"grid: k={k} must be in 1..C-1 for C={C}")
        for p in self.preprocess:
            try:
                parse_steps(None if p == "none" else p)
            except ValueError as e:
                raise PlanError(f"grid.preprocess: {e}") from None
        for g in self.guides:
            try:
                guide_config(g)
            except (TypeError, ValueError) as e:
                raise PlanError(f"grid.guides {g}: {e}") from None
        for p in self.pooling:
            try:
                parse_pooling(p)
            except ValueError as e:
                raise PlanError(f"grid.pooling: {e}") from None
        for name in self.detectors:
            get_detector_class(name)
        _ = GuideConfig


def guide_config(settings: Mapping[str, Any]):
    """A guide setting of the grid (``{preset: paper, nonneg: topk, k_g: 64, ...}``) as a GuideConfig."""
    from spg_dist.guides import GuideConfig

    s = dict(settings)
    base = GuideConfig.preset(s.pop("preset", "paper"))
    return dataclasses.replace(base, **s)


def guide_label(settings: Mapping[str, Any]) -> str:
    cfg = guide_config(settings)
    core = f"topk k_g={cfg.k_g}" if cfg.nonneg == "topk" else f"relu β={cfg.beta_l1:g}"
    extra = [f"{k}={v}" for k, v in sorted(settings.items()) if k not in ("preset", "nonneg", "k_g", "beta_l1")]
    return " ".join([settings.get("preset", "paper"), core, *extra])


@dataclass(frozen=True)
class Stage1:
    epochs: float = 1.0
    batch_tokens: int = 4096
    batch_images: int | None = None
    lr: float = 1e-3
    checkpoint_every: int = 200
    log_every: int = 50

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Stage1":
        return cls(**_strict(cls, data, "stage1"))


@dataclass(frozen=True)
class Resources:
    """Per trial group (one Ray task): CPUs, GPUs (fractions let small single-worker trials share a GPU)."""

    cpus: float = 1.0
    gpus: float = 0.0
    workers: int = 1

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Resources":
        r = cls(**_strict(cls, data, "resources"))
        if r.cpus <= 0 or r.gpus < 0 or r.workers < 1:
            raise PlanError(f"resources: cpus must be > 0, gpus >= 0, workers >= 1 (got {r})")
        if r.workers > 1 and 0 < r.gpus < 1:
            raise PlanError("resources: fractional gpus are for single-worker trials only (NCCL refuses two ranks "
                            "on one GPU); use gpus: 1 with workers > 1")
        return r


@dataclass(frozen=True)
class Trial:
    trial_id: str
    group_id: str
    detector: str
    config: dict[str, Any]

    @property
    def direction(self) -> Direction:
        return Direction(self.config["aux"], self.config["target"])


@dataclass(frozen=True)
class SweepPlan:
    name: str
    grid: Grid
    data: dict[str, str] = field(default_factory=dict)
    stage1: Stage1 = Stage1()
    resources: Resources = Resources()
    detector_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    resolution: int | str | None = None
    store: str | None = None
    weights: dict[str, str] = field(default_factory=dict)  # backbone -> local weights (path or hub id)
    share: bool = True  # False: every trial trains its own SAE in its own pass (the baseline bench/sweep.py measures)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], default_name: str = "sweep") -> "SweepPlan":
        d = _strict(cls, data, "sweep config")
        name = str(d.get("name") or default_name)
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise PlanError(f"name {name!r}: use letters, digits, '-', '_' and '.' (it names the sweep in the store)")
        if "grid" not in d:
            raise PlanError("sweep config: no grid (see configs/sweep-demo.yaml)")
        data_map = d.get("data") or {}
        if not isinstance(data_map, Mapping):
            raise PlanError("data: expected a mapping DATASET_NAME: LAYOUT:PATH")
        params = d.get("detector_params") or {}
        if not isinstance(params, Mapping) or not all(isinstance(v, Mapping) for v in params.values()):
            raise PlanError("detector_params: expected a mapping DETECTOR: {SETTING: VALUE}")
        res = d.get("resolution")
        if res is not None and not (isinstance(res, int) and res > 0 or res in ("native", "input")):
            raise PlanError(f"resolution: {res!r} is not a number of pixels, input or native")
        weights = d.get("weights") or {}
        if not isinstance(weights, Mapping):
            raise PlanError("weights: expected a mapping BACKBONE: PATH")
        plan = cls(name=name, grid=Grid.from_dict(d["grid"]), data={str(k): str(v) for k, v in data_map.items()},
                   stage1=Stage1.from_dict(d.get("stage1") or {}), resources=Resources.from_dict(d.get("resources") or {}),
                   detector_params={str(k): dict(v) for k, v in params.items()}, resolution=res,
                   store=d.get("store"), weights={str(k): str(v) for k, v in weights.items()},
                   share=bool(d.get("share", True)))
        for det, p in plan.detector_params.items():
            from spg_dist.detectors import DetectorConfigError, create_detector

            try:
                create_detector(det, **p)
            except DetectorConfigError as e:
                raise PlanError(f"detector_params.{det}: {e}") from None
        return plan

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=list))

    def datasets(self) -> list[str]:
        return sorted({x for d in self.grid.direction for x in (Direction.parse(d).aux, Direction.parse(d).target)})

    def trials(self) -> list[Trial]:
        g = self.grid
        out: list[Trial] = []
        for backbone, token, layer, direction, seed in itertools.product(g.backbone, g.token, g.layer, g.direction,
                                                                         g.seed):
            dr = Direction.parse(direction)
            base = dict(backbone=backbone, token=token, layer=layer, aux=dr.aux, target=dr.target, seed=seed)
            for detector in g.detectors:
                params = self.detector_params.get(detector, {})
                if detector != "spg":
                    cfg = {**base, "detector": detector, "params": params}
                    out.append(_trial(detector, cfg, _digest(cfg)))
                    continue
                for pre in g.preprocess:
                    group = _digest({**base, "preprocess": pre, "stage1": dataclasses.asdict(self.stage1)})
                    for C, k, sp, guides, pooling in itertools.product(g.C, g.k, g.sparsifier, g.guides, g.pooling):
                        cfg = {**base, "detector": "spg", "preprocess": pre, "C": C, "k": k, "sparsifier": sp,
                               "guides": dict(guides), "pooling": pooling, "stage1": dataclasses.asdict(self.stage1)}
                        out.append(_trial("spg", cfg, group if self.share else _digest(cfg)))
        seen: dict[str, Trial] = {}
        for t in out:
            seen.setdefault(t.trial_id, t)
        return list(seen.values())

    def groups(self) -> dict[str, list[Trial]]:
        groups: dict[str, list[Trial]] = {}
        for t in self.trials():
            groups.setdefault(t.group_id, []).append(t)
        return groups

    def describe(self) -> dict[str, Any]:
        """The resolved plan: every setting and every trial, as JSON (``--dry-run``)."""
        trials = self.trials()
        return {"plan": self.to_dict(), "datasets": self.datasets(), "trials": len(trials),
                "groups": len(self.groups()),
                "sae_passes": len({t.group_id for t in trials if t.detector == "spg"}),
                "saes": len({(t.group_id, t.config["C"], t.config["k"], t.config["sparsifier"])
                             for t in trials if t.detector == "spg"}),
                "trial_list": [{"trial_id": t.trial_id, "group_id": t.group_id, **t.config} for t in trials]}


def _digest(obj: Any, n: int = 12) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _trial(detector: str, cfg: dict[str, Any], group: str) -> Trial:
    return Trial(f"{detector}-{_digest(cfg)}", f"{detector}-{group}", detector, cfg)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise PlanError(f"config {str(p)!r} does not exist (see configs/ for examples)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise PlanError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise PlanError(f"{p}: expected a mapping at the top level")
    return data


def load_sweep(path: str | os.PathLike) -> SweepPlan:
    return SweepPlan.from_dict(read_yaml(path), default_name=Path(path).stem)


def estimated_seconds(plan: SweepPlan, images_per_dataset: Mapping[str, int], tokens_per_image: int, dim: int,
                      gpus: float = 0.0) -> dict[str, float]:
    """A rough cost of the plan: SAE FLOPs per pass (encoder 2·N·d·C, sparse decoder and backward ~3·N·k·d), at an
    assumed throughput (CPU: 20 GFLOP/s per core; GPU: 3.5 M tokens/s at C = 8192 on an H200, scaled by C)."""
    per_pass = 0.0
    for t in {(tr.group_id, tr.config["C"], tr.config["k"]): tr for tr in plan.trials() if tr.detector == "spg"}.values():
        n = images_per_dataset.get(t.config["aux"], 0) * tokens_per_image * plan.stage1.epochs
        C, k = t.config["C"], t.config["k"]
        if gpus > 0:
            per_pass += n / (3.5e6 * 8192 / max(C, 1)) / gpus
        else:
            per_pass += n * (6 * dim * C + 6 * k * dim) / 20e9
    trials = len(plan.trials())
    return {"sae_seconds": round(per_pass, 1), "trials": trials,
            "evaluation_seconds": round(trials * 2.0, 1), "total_seconds": round(per_pass + trials * 2.0, 1),
            "assumptions": "CPU 20 GFLOP/s per trial; H200 3.5 M tokens/s at C = 8192 (measured on one H200); 2 s per evaluation"
                           if not math.isnan(per_pass) else ""}


__all__ = ["DIRECTION_SEP", "Direction", "Grid", "PlanError", "Resources", "Stage1", "SweepPlan", "Trial",
           "estimated_seconds", "guide_config", "guide_label", "load_sweep", "read_yaml"]
