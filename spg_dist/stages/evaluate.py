"""The one evaluation loop: any detector's patch scores -> anomaly maps, image scores, metrics, ``eval_results``.

For every target category (test split): fit where the detector's scope says so, score the test tokens in
batches, upsample patch scores bilinearly to the evaluation resolution, let the detector post-process its maps,
pool image scores the detector's way (over the patch grid or over the map), and compute image AUROC/AP, pixel
AUROC and AUPRO against the ground-truth masks at that same resolution. Every detector goes through exactly this,
so their rows in ``eval_results`` compare like with like. Optional reports: per-category CSV/Markdown, overlays,
and a τ sweep of log-sum-exp pooling computed from the maps already in memory.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from spg_dist.detectors.base import Detector, FitData
from spg_dist.evaluation import METRICS, evaluate_category, mean_over_categories
from spg_dist.guides import upsample
from spg_dist.stages.inputs import MASK_SCALE, InputSource, load_masks, load_native_masks
from spg_dist.store import Store, eval_results

FitFn = Callable[[Detector, FitData], None]


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


@dataclass
class EvalResult:
    """One evaluation run: the per-category table (``mean`` last; fractions), and what produced it."""

    run: str
    detector: str
    target_dataset: str
    table: pd.DataFrame
    params: dict[str, Any]
    backbone: str
    layers: list[int]
    aux: list[str]
    shots: int
    pooling: str
    resolution: str
    seconds: float
    fit_seconds: float = 0.0
    report: dict[str, Any] | None = None
    tau_sweep: pd.DataFrame | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> dict[str, float]:
        return self.table.loc["mean"].to_dict()

    def summary(self) -> str:
        m = self.mean
        return (f"{self.detector} on {self.target_dataset}: " +
                " ".join(f"{k} {100 * m[k]:.1f}" for k in METRICS) + f" ({self.seconds:.1f} s)")


def results_frame(results: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    df = pd.DataFrame.from_dict(dict(results), orient="index")[list(METRICS)]
    df.index.name = "category"
    return df


def default_run(detector: Detector, backbone: str, layers: Sequence[int], aux: Sequence[str], shots: int,
                resolution: str, extra: Mapping[str, Any] | None = None) -> str:
    """``<detector>/<backbone>/L<layers>/<hash of settings, aux data, shots, resolution>``: the same run name for
    the same evaluation, so a re-run replaces its rows instead of adding a run."""
    payload = json.dumps({"params": detector.params(), "aux": list(aux), "shots": shots, "resolution": resolution,
                          **(extra or {})}, sort_keys=True, default=str)
    digest = hashlib.sha1(payload.encode()).hexdigest()[:10]
    return f"{detector.name}/{backbone}/L{','.join(map(str, layers)) or '-'}/{digest}"


def _maps(patch: np.ndarray, size: int) -> np.ndarray:
    return upsample(torch.from_numpy(np.ascontiguousarray(patch, np.float32)), size).numpy()


RESOLUTIONS = ("native", "input")


def resolve_resolution(resolution: int | str | None, source: InputSource) -> int | str:
    """The side the maps and masks are compared at: an int (square), ``"input"`` (the extraction size), or
    ``"native"`` (each image at its own size, masks at full resolution: the paper's protocol)."""
    if resolution is None:
        return int(MASK_SCALE * max(source.grid()))
    if isinstance(resolution, str) and not resolution.isdigit():
        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution {resolution!r}: use a number of pixels, input or native")
        return int(source.image_size()) if resolution == "input" else "native"
    if int(resolution) < 1:
        raise ValueError(f"resolution {resolution!r} must be >= 1")
    return int(resolution)


def evaluate_detector(store: Store, detector: Detector, source: InputSource, *, run: str | None = None,
                      resolution: int | str | None = None, categories: Sequence[str] | None = None,
                      fit: FitFn | None = None, batch_size: int = 64, report_dir: str | Path | None = None,
                      overlays: int = 8, taus: Sequence[float] | None = None, guide_id: str = "",
                      sae_id: str = "", shots: int = 0, aux: Sequence[str] | None = None, write: bool = True,
                      on_category: Callable[[str], None] | None = None,
                      on_images: Callable[[int], None] | None = None,
                      keep_maps: Sequence[str] | None = None) -> EvalResult:
    """Evaluate ``detector`` on the test split of ``source.target`` (see the module docstring).

    ``fit(detector, data)`` fits (default ``detector.fit``; ``spg detect`` passes one that reuses stored weights);
    ``resolution`` is the side of the square maps and masks are compared at (default 4 x the token grid; ``input``:
    the extraction size; ``native``: each image and its full-resolution mask at their own size); ``aux``
    the datasets the model was trained on, as recorded (default: what the detector reads now). ``on_images(n)``
    after every scored batch of n test images (progress bars). Maps and masks are held one category at a time
    (all of them only for a report or a τ sweep), so memory follows the largest category, not the dataset.
    ``keep_maps``: image ids whose anomaly maps are returned in ``extra["maps"]`` (pictures of a few images).
    """
    t0 = time.perf_counter()
    inputs = detector.inputs()
    fit = fit or (lambda det, data: det.fit(data))
    meta = source.target_meta()
    cats = sorted(set(meta.column("category").to_pylist()))
    if categories:
        cats = [c for c in cats if c in set(categories)]
    size = resolve_resolution(resolution, source)  # (detect passes one for pixel-only detectors)
    native = size == "native"
    uris = source.uris(source.target)
    sizes = source.sizes(source.target) if native else {}
    fit_seconds = 0.0

    def fit_data(for_cats: Sequence[str], category: str | None) -> FitData:
        data = FitData(category=category)
        if inputs.shots:
            data.shots = source.shots(for_cats, inputs.shots, with_uris=inputs.images)
            if inputs.corruptions:
                data.corrupted = source.corrupted(data.shots)
        if inputs.aux:
            data.aux = source.aux_set(inputs.mask_size, with_tokens=bool(source.layers))
        if inputs.unlabelled_target and category is not None:
            data.unlabelled = source.unlabelled(category)
        return data

    def timed_fit(data: FitData) -> None:
        nonlocal fit_seconds
        s = time.perf_counter()
        fit(detector, data)
        fit_seconds += time.perf_counter() - s

    if inputs.scope == "dataset" and (inputs.shots or inputs.aux):
        timed_fit(fit_data(cats, None))
    per: dict[str, dict[str, Any]] = {}
    results: dict[str, dict[str, float]] = {}
    keep, kept = set(keep_maps or ()), {}
    for cat in cats:
        if inputs.scope == "category" or inputs.unlabelled_target:
            timed_fit(fit_data([cat], cat))
        test = source.test_set(cat, with_uris=inputs.images)
        scores, maps = [], []
        for s in range(0, len(test), batch_size):
            part = test.subset(np.arange(s, min(s + batch_size, len(test))))
            patch = np.asarray(detector.score(part), np.float32)
            scores.append(patch)
            if native:  # each image at its own size (upsampled one by one: sizes may differ)
                maps.extend(detector.postprocess_maps(_maps(patch[i:i + 1], sizes[iid]))[0].astype(np.float32)
                            for i, iid in enumerate(part.image_ids))
            else:
                maps.append(detector.postprocess_maps(_maps(patch, size)))
            if on_images:
                on_images(len(part.image_ids))
        patch_scores = np.concatenate(scores)
        if native:
            amaps = maps
            image = (np.array([detector.image_scores(m[None])[0] for m in amaps]) if detector.pool_on == "map"
                     else detector.image_scores(patch_scores))
            masks = load_native_masks(test.image_ids, uris, sizes)
        else:
            amaps = np.concatenate(maps).astype(np.float32)
            image = detector.image_scores(amaps if detector.pool_on == "map" else patch_scores)
            masks = load_masks(test.image_ids, uris, size)
        kept.update({iid: np.asarray(amaps[i], np.float32) for i, iid in enumerate(test.image_ids) if iid in keep})
        labels = np.asarray(test.labels)
        # an anomalous image without a mask (its mask was missing or refused at extraction: an errors row) has no
        # pixel ground truth: it counts for the image metrics, not for the pixel ones
        has_truth = [not (lab == 1 and not uris.get(i, ("", ""))[1]) for i, lab in zip(test.image_ids, labels)]
        if all(has_truth):
            results[cat] = evaluate_category(labels, image, masks, amaps)
        else:
            keep = np.flatnonzero(has_truth)
            pick = (lambda xs: [xs[i] for i in keep]) if native else (lambda xs: xs[keep])
            results[cat] = {**evaluate_category(labels, image, masks, amaps),
                            **{k: v for k, v in evaluate_category(labels[keep], image[keep], pick(masks),
                                                                  pick(amaps)).items()
                               if k in ("pixel_auroc", "aupro")}}
        if report_dir is not None or taus:
            per[cat] = {"ids": test.image_ids, "labels": labels, "scores": image, "masks": masks, "maps": amaps}
        del masks, amaps, maps, scores
        if on_category:
            on_category(cat)
    results["mean"] = mean_over_categories(results)
    table = results_frame(results)
    layers = list(source.layers)
    aux = list(aux) if aux is not None else (list(source.aux or []) if inputs.aux else [])
    res = str(size)
    run = run or default_run(detector, source.backbone, layers, aux, shots, res)
    seconds = time.perf_counter() - t0
    out = EvalResult(run, detector.name, source.target, table, detector.params(), source.backbone, layers, aux,
                     shots, detector.pooling, res, seconds, fit_seconds)
    if keep_maps is not None:
        out.extra["maps"] = kept
    if write:
        now = utc_now()
        params = json.dumps(detector.params(), sort_keys=True, default=str)
        eval_results.write(store, [dict(run=run, detector=detector.name, params=params, backbone=source.backbone,
                                        layers=",".join(map(str, layers)), guide_id=guide_id, sae_id=sae_id,
                                        aux_dataset="+".join(aux), shots=int(shots), target_dataset=source.target,
                                        category=cat, metric=m, value=float(r[m]), pooling=detector.pooling,
                                        resolution=res, seconds=float(seconds), created_at=now)
                                   for cat, r in results.items() for m in METRICS])
    if taus and native:
        raise ValueError("a τ sweep needs maps of one size: use a numeric --resolution with --taus")
    if taus:
        from spg_dist.viz.sweeps import tau_sweep

        out.tau_sweep = tau_sweep({c: (d["labels"], d["maps"]) for c, d in per.items()}, taus)
    if report_dir is not None:
        out.report = write_report(Path(report_dir), out, per, {k: v[0] for k, v in uris.items()}, overlays)
    return out


def markdown_table(df: pd.DataFrame, floatfmt: str = ".4f") -> str:
    """pandas ``to_markdown`` when ``tabulate`` is importable, else the same pipe table written by hand."""
    try:
        import tabulate  # noqa: F401
    except ImportError:
        cols = [str(n) for n in (df.index.names if df.index.nlevels > 1 else [df.index.name or ""])]
        lines = ["| " + " | ".join(cols + [str(c) for c in df.columns]) + " |",
                 "|" + "|".join([":---"] * len(cols) + ["---:"] * len(df.columns)) + "|"]
        for idx, r in df.iterrows():
            keys = list(idx) if isinstance(idx, tuple) else [idx]
            lines.append("| " + " | ".join([str(k) for k in keys] + [format(float(v), floatfmt) for v in r.to_numpy()])
                         + " |")
        return "\n".join(lines) + "\n"
    return df.to_markdown(floatfmt=floatfmt) + "\n"


def write_report(report_dir: Path, result: EvalResult, per: dict[str, dict[str, Any]], image_uris: dict[str, str],
                 overlays: int) -> dict[str, Any]:
    """``metrics.csv``/``metrics.md``, ``overlays/<category>__<image>.png`` and with a τ sweep ``tau_sweep.*``."""
    from spg_dist.viz.overlays import write_category_overlays

    report_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Any] = {"metrics_csv": str(report_dir / "metrics.csv"), "metrics_md": str(report_dir / "metrics.md")}
    result.table.to_csv(paths["metrics_csv"])
    head = (f"# {result.run}\n\n`{result.detector}` on `{result.target_dataset}` (backbone {result.backbone}, "
            f"pooling {result.pooling}, maps and masks at {result.resolution} px)\n\n")
    Path(paths["metrics_md"]).write_text(head + markdown_table(result.table))
    written: list[str] = []
    if overlays > 0:
        for cat, d in sorted(per.items()):
            written += [str(p) for p in write_category_overlays(cat, d["ids"], d["labels"], d["scores"], d["masks"],
                                                                d["maps"], image_uris, report_dir / "overlays",
                                                                n=overlays)]
    paths["overlays"] = written
    if result.tau_sweep is not None:
        from spg_dist.viz.sweeps import tau_sweep_png

        paths["tau_sweep_csv"] = str(report_dir / "tau_sweep.csv")
        result.tau_sweep.to_csv(paths["tau_sweep_csv"], index=False)
        paths["tau_sweep_png"] = str(tau_sweep_png(result.tau_sweep, report_dir / "tau_sweep.png",
                                                   title=f"{result.target_dataset}: image AUROC / AP against τ"))
    return paths


__all__ = ["EvalResult", "FitFn", "default_run", "evaluate_detector", "markdown_table", "results_frame",
           "utc_now", "write_report"]
