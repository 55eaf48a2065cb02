"""Stage 2 on the driver (pure PyTorch, no Ray): train guides on auxiliary data, evaluate them zero-shot.

* :func:`train_guides` — frozen SAE + all tokens and masks of the auxiliary dataset(s) -> one ``guides`` row
  (sparse EMA coefficients z̃, active sets, curve). Idempotent: the guide id hashes the SAE, the auxiliary data and
  the config, and an id already stored is returned without training.
* :func:`evaluate` — the EMA guides on every test image of a target dataset -> maps and image scores -> the four
  metrics per category and their mean, upserted into ``eval_results`` (a re-run replaces its rows).
* :func:`load_guides` — the :class:`~spg_dist.guides.Guides` module rebuilt from a stored row.

Both stages are small (two coefficient vectors; one forward per image), so they run where the store is read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from spg_dist.distributed.eval_io import (MASK_SCALE, load_masks, mask_uris, results_frame, token_grid, utc_now,
                                          write_eval_results)
from spg_dist.evaluation import evaluate_category, mean_over_categories
from spg_dist.guides import GuideConfig, GuideTrainer, Guides, image_scores, parse_pooling, upsample
from spg_dist.store.connection import Store
from spg_dist.store.sae_models import load_sae, sae_row
from spg_dist.store.tokens import iter_tokens, load_tokens, sql_literal, where_clause

DETECTOR = "spg"


class NoAuxiliaryDataError(LookupError):
    """The auxiliary dataset has no tokens for the SAE's backbone/layer, or no anomalous image with a mask."""


class NoTargetDataError(LookupError):
    """The target dataset has no test tokens for the guides' backbone/layer."""


class UnknownGuidesError(LookupError):
    """No ``guides`` row with that id; the message lists the ids that exist."""


class CategoryOverlapError(ValueError):
    """Target categories also appear in the auxiliary data: not a zero-shot evaluation (pass allow_overlap)."""


def _datasets(aux_dataset: str | Sequence[str]) -> list[str]:
    names = [aux_dataset] if isinstance(aux_dataset, str) else list(aux_dataset)
    names = sorted(dict.fromkeys(names))
    if not names or any(not isinstance(n, str) or not n for n in names):
        raise ValueError(f"aux_dataset must be a dataset name or a non-empty list of names, got {aux_dataset!r}")
    return names


def guide_id_for(sae_id: str, aux_datasets: Sequence[str], config: GuideConfig, mask_size: int) -> str:
    payload = json.dumps({"guide": config.to_dict(), "mask_size": int(mask_size)}, sort_keys=True)
    return f"{sae_id}/guides-{'+'.join(aux_datasets)}-{hashlib.sha1(payload.encode()).hexdigest()[:10]}"


def _guide_row(store: Store, guide_id: str) -> dict[str, Any] | None:
    tbl = store.read("guides", where=f"guide_id = {sql_literal(guide_id)}")
    return tbl.to_pylist()[0] if tbl.num_rows else None


def _sparse(z: torch.Tensor) -> tuple[list[int], list[float]]:
    idx = torch.nonzero(z > 0).flatten()
    return idx.tolist(), z[idx].tolist()


def train_guides(store: Store | str, sae_id: str, aux_dataset: str | list[str], config: GuideConfig | None = None,
                 mask_size: int | None = None, progress: bool = True, device: str | None = None) -> dict[str, Any]:
    """Train a guide pair on the auxiliary dataset(s) over the frozen SAE ``sae_id``; returns the ``guides`` row
    (without re-training when that guide id is already stored)."""
    store = store if isinstance(store, Store) else Store(store)
    from tqdm.auto import tqdm

    config = config or GuideConfig()
    aux = _datasets(aux_dataset)
    meta_row = sae_row(store, sae_id, with_weights=False)
    backbone, layer = meta_row["backbone"], int(meta_row["layer"])
    grid = token_grid(store, backbone, layer, dataset=aux)
    if grid is None:
        raise NoAuxiliaryDataError(f"no patch tokens of {backbone} layer {layer} for auxiliary dataset(s) "
                                   f"{'+'.join(aux)} in {store.uri}; extract them first (`spg extract`)")
    mask_size = int(mask_size or MASK_SCALE * max(grid))
    guide_id = guide_id_for(sae_id, aux, config, mask_size)
    if (row := _guide_row(store, guide_id)) is not None:
        return row

    meta, toks = load_tokens(store, backbone, layer, dataset=aux)
    ids = meta.column("image_id").to_pylist()
    labels = np.asarray(meta.column("label").to_pylist())
    masks = load_masks(ids, mask_uris(store, aux), mask_size)
    if not ((labels == 1) & masks.reshape(len(ids), -1).any(1)).any():
        raise NoAuxiliaryDataError(f"auxiliary dataset(s) {'+'.join(aux)} have no anomalous image with a "
                                   f"non-empty mask ({len(ids)} images); guides need pixel labels")

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    sae = load_sae(store, sae_id, device=device)
    trainer = GuideTrainer(sae, config)
    trainer.guides.to(device)
    bar = tqdm(total=config.steps, desc=f"guides {'+'.join(aux)}", disable=not progress)

    def show(row: dict[str, Any]) -> None:
        bar.update()
        bar.set_postfix(loss=f"{row['loss']:.4f}", active_A=row["active_anomaly"])

    trainer.fit(toks, masks, device, on_step=show)
    bar.close()

    z = trainer.guides.coefficients(ema=True).detach().float().cpu()
    (ni, nv), (ai, av) = _sparse(z[0]), _sparse(z[1])
    stored = dict(
        guide_id=guide_id, sae_id=sae_id, aux_dataset="+".join(aux),
        config=json.dumps({"guide": config.to_dict(), "mask_size": mask_size, "backbone": backbone, "layer": layer,
                           "aux_images": len(ids)}, sort_keys=True),
        normal_indices=pa.array(ni, pa.int32()), normal_values=pa.array(nv, pa.float32()),
        anomaly_indices=pa.array(ai, pa.int32()), anomaly_values=pa.array(av, pa.float32()),
        active_normal=len(ni), active_anomaly=len(ai), steps=trainer.step_count,
        curve=json.dumps(trainer.curve), created_at=utc_now())
    table = pa.table({k: ([v] if not isinstance(v, pa.Array) else pa.array([v.to_pylist()], pa.large_list(v.type)))
                      for k, v in stored.items()})
    store.upsert("guides", table)
    return _guide_row(store, guide_id)


def load_guides(store: Store | str, guide_id: str, device: str = "cpu") -> Guides:
    """The EMA guides of a stored row (coefficients into both ``z_ema`` and ``z_bar``), SAE frozen, eval mode."""
    store = store if isinstance(store, Store) else Store(store)
    row = _guide_row(store, guide_id)
    if row is None:
        known = store.read("guides", columns=["guide_id"]).column("guide_id").to_pylist()
        raise UnknownGuidesError(f"no guides {guide_id!r} in {store.uri}; known: {', '.join(sorted(known)) or 'none'}"
                                 f" (train them with train_guides)")
    config = GuideConfig.from_dict(json.loads(row["config"])["guide"])
    guides = Guides(load_sae(store, row["sae_id"], device=device), config).to(device)
    z = torch.zeros_like(guides.z_ema)
    for r, (i, v) in enumerate(((row["normal_indices"], row["normal_values"]),
                                (row["anomaly_indices"], row["anomaly_values"]))):
        z[r, torch.as_tensor(i, dtype=torch.long)] = torch.as_tensor(v, dtype=z.dtype)
    with torch.no_grad():
        guides.z_ema.copy_(z)
        guides.z_bar.copy_(z)
    return guides.eval()


def _categories(store: Store, backbone: str, layer: int, **filters: Any) -> set[str]:
    tbl = store.read("patch_tokens", where=where_clause(backbone=backbone, layer=layer, **filters),
                     columns=["category"])
    return set(tbl.column("category").to_pylist())


@torch.no_grad()
def _image_uris(store: Store, dataset: str) -> dict[str, str]:
    tbl = store.read("images", where=where_clause(dataset=[dataset]), columns=["image_id", "image_uri"])
    return dict(zip(tbl.column("image_id").to_pylist(), tbl.column("image_uri").to_pylist()))


def _markdown_table(df: pd.DataFrame) -> str:
    """pandas ``to_markdown`` when ``tabulate`` is importable, else the same pipe table written by hand."""
    try:
        import tabulate  # noqa: F401
    except ImportError:
        cols = [df.index.name or ""] + [str(c) for c in df.columns]
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join([":---"] + ["---:"] * len(df.columns)) + "|"]
        for idx, r in df.iterrows():
            lines.append("| " + " | ".join([str(idx)] + [f"{float(v):.4f}" for v in r.to_numpy()]) + " |")
        return "\n".join(lines) + "\n"
    return df.to_markdown(floatfmt=".4f") + "\n"


def _write_report(report_dir: Path, df: pd.DataFrame, per: dict[str, dict[str, list]], image_uris: dict[str, str],
                  overlays: int, sweep: pd.DataFrame | None) -> dict[str, Any]:
    from spg_dist.viz.overlays import write_category_overlays

    report_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Any] = {"metrics_csv": str(report_dir / "metrics.csv"), "metrics_md": str(report_dir / "metrics.md")}
    df.to_csv(paths["metrics_csv"])
    a = df.attrs
    head = (f"# {a.get('run')}\n\nguides `{a.get('guide_id')}` on `{a.get('target_dataset')}` "
            f"(pooling {a.get('pooling')}, mask {a.get('mask_size')} px)\n\n")
    Path(paths["metrics_md"]).write_text(head + _markdown_table(df))
    written: list[str] = []
    if overlays > 0:
        for cat, d in sorted(per.items()):
            written += [str(p) for p in write_category_overlays(cat, d["ids"], d["labels"], d["scores"], d["masks"],
                                                                d["maps"], image_uris, report_dir / "overlays",
                                                                n=overlays)]
    paths["overlays"] = written
    if sweep is not None:
        from spg_dist.viz.sweeps import tau_sweep_png

        paths["tau_sweep_csv"] = str(report_dir / "tau_sweep.csv")
        sweep.to_csv(paths["tau_sweep_csv"], index=False)
        paths["tau_sweep_png"] = str(tau_sweep_png(sweep, report_dir / "tau_sweep.png",
                                                   title=f"{a.get('target_dataset')}: image AUROC / AP against τ"))
    return paths


def evaluate(store: Store | str, guide_id: str, target_dataset: str, pooling: str = "max", allow_overlap: bool = False,
             run: str | None = None, mask_size: int | None = None, batch_size: int = 64,
             device: str | None = None, report_dir: str | Path | None = None, overlays: int = 8,
             taus: Sequence[float] | None = None) -> pd.DataFrame:
    """Zero-shot evaluation of stored guides on the test split of ``target_dataset``.

    Returns one row per category plus ``mean`` (index ``category``; columns image_auroc, image_ap, pixel_auroc,
    aupro) and upserts the same numbers into ``eval_results`` under ``run`` (default ``<guide_id>@<pooling>``).

    ``taus``: also sweep ``lse:τ`` image pooling over the maps already computed (max pooling as the τ -> 0
    reference); the sweep (one row per τ, see :func:`spg_dist.viz.sweeps.tau_sweep`) is returned as records in
    ``df.attrs["tau_sweep"]``. ``report_dir``: write ``metrics.csv``, ``metrics.md``, ``overlays/<category>__<image>.png``
    for up to ``overlays`` images per category (anomalous first) and, with ``taus``, ``tau_sweep.csv`` /
    ``tau_sweep.png``; the paths are in ``df.attrs["report"]``.
    """
    store = store if isinstance(store, Store) else Store(store)
    parse_pooling(pooling)  # refuse a bad spec before any work
    if taus is not None:
        from spg_dist.viz.sweeps import parse_taus

        taus = parse_taus(taus)
    overlays = int(overlays)
    if overlays < 0:
        raise ValueError(f"overlays must be >= 0, got {overlays}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    guides = load_guides(store, guide_id, device=device)
    row = _guide_row(store, guide_id)
    info = json.loads(row["config"])
    sae_meta = sae_row(store, row["sae_id"], with_weights=False)
    backbone, layer = sae_meta["backbone"], int(sae_meta["layer"])
    aux = row["aux_dataset"].split("+")

    grid = token_grid(store, backbone, layer, dataset=target_dataset, split="test")
    if grid is None:
        raise NoTargetDataError(f"no test-split patch tokens of {backbone} layer {layer} for target dataset "
                                f"{target_dataset!r} in {store.uri}; extract them first (`spg extract`)")
    target_cats = _categories(store, backbone, layer, dataset=target_dataset, split="test")
    overlap = sorted(target_cats & _categories(store, backbone, layer, dataset=aux))
    if overlap and not allow_overlap:
        raise CategoryOverlapError(f"target {target_dataset!r} shares categories {overlap} with the auxiliary data "
                                   f"{row['aux_dataset']!r} of {guide_id}: not zero-shot; pass allow_overlap=True (--allow-overlap) "
                                   f"to evaluate anyway")
    mask_size = int(mask_size or MASK_SCALE * max(grid))
    uris = mask_uris(store, [target_dataset])

    per: dict[str, dict[str, list]] = {}
    for meta, toks in iter_tokens(store, backbone, layer, dataset=target_dataset, split="test",
                                  batch_size=batch_size):
        ids = meta.column("image_id").to_pylist()
        p = guides.patch_probs(torch.from_numpy(toks.astype(np.float32)).to(device), ema=True)
        maps = upsample(p, mask_size)
        scores = image_scores(maps, pooling).cpu().numpy()
        maps = maps.cpu().numpy().astype(np.float32)
        masks = load_masks(ids, uris, mask_size)
        for i, (cat, label) in enumerate(zip(meta.column("category").to_pylist(), meta.column("label").to_pylist())):
            d = per.setdefault(cat, {"ids": [], "labels": [], "scores": [], "masks": [], "maps": []})
            d["ids"].append(ids[i])
            d["labels"].append(int(label))
            d["scores"].append(float(scores[i]))
            d["masks"].append(masks[i])
            d["maps"].append(maps[i])

    results = {cat: evaluate_category(np.asarray(d["labels"]), np.asarray(d["scores"]), np.stack(d["masks"]),
                                      np.stack(d["maps"]))
               for cat, d in sorted(per.items())}
    results["mean"] = mean_over_categories({c: r for c, r in results.items()})
    run = run or f"{guide_id}@{pooling}"
    write_eval_results(store, results, run=run, detector=DETECTOR, target_dataset=target_dataset, pooling=pooling,
                       guide_id=guide_id, sae_id=row["sae_id"], aux_dataset=row["aux_dataset"])
    df = results_frame(results)
    df.attrs.update(run=run, guide_id=guide_id, target_dataset=target_dataset, pooling=pooling, mask_size=mask_size,
                    train_mask_size=info.get("mask_size"))
    sweep = None
    if taus:
        from spg_dist.viz.sweeps import tau_sweep

        sweep = tau_sweep({c: (np.asarray(d["labels"]), np.stack(d["maps"])) for c, d in per.items()}, taus)
        df.attrs["tau_sweep"] = sweep.to_dict("records")
    if report_dir is not None:
        df.attrs["report"] = _write_report(Path(report_dir), df, per, _image_uris(store, target_dataset), overlays,
                                           sweep)
    return df


__all__ = ["CategoryOverlapError", "NoAuxiliaryDataError", "NoTargetDataError", "UnknownGuidesError", "evaluate",
           "guide_id_for", "load_guides", "train_guides"]
