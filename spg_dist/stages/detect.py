"""``spg detect``: any registered detector on one store, through the one evaluation loop.

``detect(store, "knn", "synth_mvtec", backbone="texture-filterbank", shots=4)`` builds the detector from the
registry, resolves what only the store knows (the SAE behind SPG, the stored layers, a vector index for a large kNN
bank), checks the inputs the detector declares (``--aux`` for zero-shot methods, ``--shots`` for few-shot ones,
zero-shot overlap), reuses weights a trainable detector already fitted on the same data (``detector_models``), and
evaluates it on the target's test split into ``eval_results``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import time
from typing import Any, Callable, Mapping, Sequence

from spg_dist.detectors import Detector, FitData, create_detector
from spg_dist.errors import CategoryOverlapError, MissingInputError, UnknownNameError
from spg_dist.stages.evaluate import EvalResult, evaluate_detector, utc_now
from spg_dist.stages.inputs import InputSource
from spg_dist.store import Store, detector_models, images, tokens

Echo = Callable[[str], None]


def _datasets(v: str | Sequence[str] | None) -> list[str] | None:
    if v is None:
        return None
    out = [s.strip() for item in ([v] if isinstance(v, str) else v) for s in str(item).split(",") if s.strip()]
    return out or None


def check_dataset_names(store: Store, names: Sequence[str], option: str) -> None:
    """A dataset name the store does not know: one line listing the known ones, with a did-you-mean."""
    known = images.datasets(store)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            raise UnknownNameError(f"{option} {name!r}: no such dataset in {store.uri}; "
                                   f"{f'did you mean {close[0]!r}? ' if close else ''}"
                                   f"known: {', '.join(known) or 'none (run `spg extract` first)'}")


def resolve_backbone(store: Store, target: str, backbone: str | None) -> str:
    """``backbone`` as given, or the only backbone with test tokens of ``target``."""
    if backbone:
        return backbone
    inv = [r for r in tokens.inventory(store).to_pylist() if r["dataset"] == target]
    found = sorted({r["backbone"] for r in inv})
    if len(found) == 1:
        return found[0]
    raise MissingInputError(f"pass --backbone: the store holds tokens of {target!r} from "
                            f"{', '.join(found) if found else 'no backbone (run `spg extract` first)'}")


def default_resolution(store: Store, target: str, backbone: str | None) -> int:
    """4 x the token grid of ``target``'s stored tokens (of ``backbone``, or the first stored), else 256 px."""
    from spg_dist.stages.inputs import MASK_SCALE
    from spg_dist.store.tokens import TokenSelection

    inv = [r for r in tokens.inventory(store).to_pylist() if r["dataset"] == target
           and (backbone is None or r["backbone"] == backbone)]
    if not inv:
        return 256
    meta = tokens.metadata(store, TokenSelection.of(inv[0]["backbone"], inv[0]["layer"], dataset=target,
                                                    split="test"), ["grid_h", "grid_w"])
    return int(MASK_SCALE * max(tokens.grid_of(meta))) if meta.num_rows else 256


def check_zero_shot(source: InputSource, seen: Mapping[str, Sequence[str]], allow_overlap: bool) -> None:
    """Target categories that also occur in data a model saw (``{what: datasets}``): not zero-shot."""
    target = set(source.categories())
    for what, datasets in seen.items():
        for ds in datasets:
            if ds == source.target:
                overlap = sorted(target)
            else:
                overlap = sorted(target & set(images.rows(source.store, dataset=ds, columns=("category",))
                                              .column("category").to_pylist()))
            if overlap and not allow_overlap:
                raise CategoryOverlapError(f"target {source.target!r} shares categories {overlap} with {ds!r}, which "
                                           f"{what} saw: not zero-shot; pass --allow-overlap to evaluate anyway")


def _prepare_spg(store: Store, det: Detector, ctx: dict[str, Any], echo: Echo) -> Detector:
    """SPG scores with guides from the ``guides`` table: the given ``guides=ID``, or trained now on ``--aux`` over
    ``sae=ID`` (stored, so a re-run reuses them)."""
    from spg_dist.stages.guides import load_spg, train_guides

    s = det.settings
    pooling = {"pooling": s.pooling}
    if not s.guides:
        if not s.sae:
            raise MissingInputError("spg needs an SAE: pass --param sae=SAE_ID (see `spg saes`) or --param "
                                    "guides=GUIDE_ID (see `spg train-guides`)")
        if not ctx["aux"]:
            raise MissingInputError("spg trains its guides on a labelled auxiliary dataset: pass --aux DATASET")
        config = det.guide_config()
        g = train_guides(store, s.sae, ctx["aux"], config, mask_size=s.mask_size, device=ctx["device"],
                         on_step=ctx.get("on_step"))
        echo(f"[guides] {g.guide_id}: {'reused' if g.reused else 'trained'}, active sets {g.active_normal} normal / "
             f"{g.active_anomaly} anomaly atoms")
        guide_id = g.guide_id
    else:
        guide_id = s.guides
    spg, row = load_spg(store, guide_id, device=ctx["device"], **pooling)
    ctx.update(backbone=row["backbone"], aux=row["aux_dataset"].split("+"), guide_id=guide_id, sae_id=row["sae_id"],
               seen={"the guides": row["aux_dataset"].split("+"), "the SAE": row["sae_datasets"]})
    return spg


def _prepare_knn(store: Store, det: Detector, ctx: dict[str, Any], echo: Echo) -> Detector:
    from spg_dist.store import banks

    det.index_factory = banks.index_factory(store, nprobes=det.settings.nprobes, echo=echo)
    return det


def _prepare_foundad(store: Store, det: Detector, ctx: dict[str, Any], echo: Echo) -> Detector:
    if ctx.get("workers", 1) > 1:
        from spg_dist.ray.foundad_train import train_projector_ray

        # Ray starts (or is joined) only when the projector is trained: a stored or cached result needs none
        workers, address, num_cpus = ctx["workers"], ctx.get("address"), ctx.get("num_cpus")
        det.trainer_fn = lambda *a, **k: train_projector_ray(*a, workers=workers, address=address, num_cpus=num_cpus,
                                                             **{x: y for x, y in k.items() if x != "device"})
    return det


def _prepare_visualad(store: Store, det: Detector, ctx: dict[str, Any], echo: Echo) -> Detector:
    from spg_dist.backbones import get_config

    asked = ctx.get("backbone")
    if asked and "backbone" not in ctx["params"]:
        base = asked.split("@")[0]
        try:
            family = get_config(base).family
        except Exception:
            family = "classical"
        if family != "classical":
            det = type(det)(dataclasses.replace(det.settings, backbone=base))
    note = (f"visualad runs its own ViT ({det.settings.backbone}) on the image files"
            + (f"; the store's {asked} tokens are not a ViT's" if asked and det.settings.backbone != asked else ""))
    echo(f"[visualad] {note}")
    ctx["note"] = note
    ctx["token_backbone"] = asked
    ctx["backbone"] = det.settings.backbone
    ctx["seen"] = {"visualad": ctx["aux"] or []}
    return det


PREPARE: dict[str, Callable[[Store, Detector, dict[str, Any], Echo], Detector]] = {
    "spg": _prepare_spg, "knn": _prepare_knn, "foundad": _prepare_foundad, "visualad": _prepare_visualad}
"""Store-side preparation of the detectors that need more than their settings (a model from the store, a vector
index, a Ray Train wrapper, a ViT of their own). A plain detector needs no entry."""


def model_id_for(det: Detector, backbone: str, layers: Sequence[int], fit: Mapping[str, Any]) -> str:
    payload = json.dumps({"params": det.params(), "backbone": backbone, "layers": list(layers), "fit": fit},
                         sort_keys=True, default=str)
    return f"{det.name}/{backbone}/{hashlib.sha1(payload.encode()).hexdigest()[:12]}"


def stored_fit(store: Store, det: Detector, backbone: str, layers: Sequence[int], echo: Echo
               ) -> Callable[[Detector, FitData], None]:
    """A fit function that loads a trainable detector's weights fitted on the same data before, or fits and stores."""
    from spg_dist.sae import serialization

    def fit(d: Detector, data: FitData) -> None:
        if not d.trainable:
            d.fit(data)
            return
        described = {part: sorted(getattr(data, part).image_ids) for part in ("shots", "aux", "corrupted")
                     if getattr(data, part) is not None}
        described = {k: (hashlib.sha1("\n".join(v).encode()).hexdigest()[:16], len(v)) for k, v in described.items()}
        mid = model_id_for(d, backbone, layers, {"data": described, "category": data.category})
        row = detector_models.find(store, mid)
        if row is not None:
            tensors, _ = serialization.unpack(row["weights"])
            d.load_state_dict(tensors)
            echo(f"[{d.name}] reused fitted weights {mid}")
            return
        t0 = time.perf_counter()
        d.fit(data)
        detector_models.put(store, dict(model_id=mid, detector=d.name, params=json.dumps(d.params(), default=str),
                                        backbone=backbone, fit_data=json.dumps(described),
                                        weights=serialization.pack(d.state_dict(), {"detector": d.name}),
                                        seconds=time.perf_counter() - t0, created_at=utc_now()))
        echo(f"[{d.name}] fitted in {time.perf_counter() - t0:.1f} s, stored as {mid}")

    return fit


def detect(store: Store | str, method: str, target: str, *, backbone: str | None = None,
           aux: str | Sequence[str] | None = None, shots: int | None = None,
           params: Mapping[str, Any] | None = None, resolution: int | None = None, run: str | None = None,
           allow_overlap: bool = False, report_dir: str | None = None, overlays: int = 0,
           taus: Sequence[float] | None = None, device: str = "cpu", workers: int = 1, address: str | None = None,
           num_cpus: int | None = None, echo: Echo = lambda _: None,
           on_step: Callable[[dict[str, Any]], None] | None = None,
           on_images: Callable[[int], None] | None = None,
           keep_maps: Sequence[str] | None = None) -> EvalResult:
    """Run detector ``method`` on the test split of ``target`` and write its ``eval_results`` rows."""
    store = store if isinstance(store, Store) else Store(store)
    params = dict(params or {})
    aux_list = _datasets(aux)
    check_dataset_names(store, [target] + (aux_list or []), "dataset")
    det = create_detector(method, **params)
    fields = {f.name for f in dataclasses.fields(det.settings)}
    if shots is not None:
        if "shots" not in fields:
            raise MissingInputError(f"{method} takes no shots (it is zero-shot or transductive); drop --shots")
        det = type(det)(dataclasses.replace(det.settings, shots=int(shots)))
    ctx: dict[str, Any] = dict(target=target, aux=aux_list, backbone=backbone, device=device, workers=workers,
                               address=address, num_cpus=num_cpus, params=params, on_step=on_step, seen={},
                               guide_id="", sae_id="")
    if method != "spg" and det.inputs().aux and not aux_list:  # before any preparation prints or loads
        raise MissingInputError(f"{method} trains on a labelled auxiliary dataset: pass --aux DATASET")
    if method in PREPARE and method != "knn":
        det = PREPARE[method](store, det, ctx, echo)
    inputs = det.inputs()
    if inputs.layers:
        ctx["backbone"] = resolve_backbone(store, target, ctx["backbone"])
    if method == "knn":
        det = PREPARE["knn"](store, det, ctx, echo)
    if inputs.aux and not ctx["aux"]:
        raise MissingInputError(f"{method} trains on a labelled auxiliary dataset: pass --aux DATASET")
    if inputs.aux and method != "spg":
        ctx["seen"] = {**ctx["seen"], method: ctx["aux"]}
    source = InputSource(store, ctx["backbone"] or "", list(inputs.layers), target,
                         ctx["aux"] if inputs.aux else None)  # resolves negative layers with its one metadata read
    layers = source.layers
    if resolution is None and not layers:  # compare at the resolution the token-based detectors use on this target
        resolution = default_resolution(store, target, ctx.get("token_backbone"))
    check_zero_shot(source, ctx["seen"], allow_overlap)
    result = evaluate_detector(store, det, source, run=run, resolution=resolution, report_dir=report_dir,
                               overlays=overlays, taus=taus, guide_id=ctx["guide_id"], sae_id=ctx["sae_id"],
                               shots=inputs.shots, aux=sorted({d for ds in ctx["seen"].values() for d in ds}),
                               fit=stored_fit(store, det, ctx["backbone"] or "", layers, echo), on_images=on_images,
                               keep_maps=keep_maps)
    result.extra.update(guide_id=ctx["guide_id"], sae_id=ctx["sae_id"])
    if "note" in ctx:
        result.extra["note"] = ctx["note"]
    return result


__all__ = ["PREPARE", "check_dataset_names", "check_zero_shot", "default_resolution", "detect", "model_id_for", "resolve_backbone",
           "stored_fit"]
