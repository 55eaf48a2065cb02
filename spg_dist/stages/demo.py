"""``spg demo``: the project's main job end to end on data it makes itself, re-using whatever the store holds.

Synthesise two datasets with disjoint categories (MVTec and VisA layouts) and extract both (plus CutPaste-corrupted
copies of the normal train images for FoundAD); then in each direction (aux -> target): train a TopK SAE on the
auxiliary tokens with Ray Train, and evaluate every chosen detector on the target through the one evaluation loop:
SPG's guides (trained on the auxiliary masks, zero-shot), and the other detectors on the same stored tokens
(few-shot kNN, LAKE and FoundAD, label-free MuSc, zero-shot VisualAD with a ViT of its own). Prints one table of
every method with its wall time and writes atom galleries of SPG's strongest anomaly atoms. Every stage is
idempotent, so a re-run only does what is missing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from spg_dist.store import Store

METRIC_NAMES = {"image_auroc": "img AUROC", "image_ap": "img AP", "pixel_auroc": "px AUROC", "aupro": "AUPRO"}
DEFAULT_DETECTORS = ("spg", "knn", "musc", "lake", "foundad", "visualad")
LABELS = {"spg": "SPG (ours, zero-shot)", "knn": "kNN {shots}-shot", "musc": "MuSc (label-free)",
          "lake": "LAKE {shots}-shot", "foundad": "FoundAD {shots}-shot", "visualad": "VisualAD (zero-shot)"}
# settings that keep every detector within the demo's budget on 2 CPU cores (recorded with every result)
DEMO_PARAMS: dict[str, dict[str, Any]] = {"foundad": {"steps": 300, "width": 128, "heads": 4, "depth": 6},
                                          "visualad": {"epochs": 2, "image_size": 112}}


def parse_detectors(spec: str | Sequence[str] | None) -> list[str]:
    """``all`` or a comma list of registry names (checked against the registry)."""
    from spg_dist.detectors import get_detector_class, list_detectors

    if spec is None or spec == "all" or spec == ["all"]:
        return list(DEFAULT_DETECTORS) + [d for d in list_detectors() if d not in DEFAULT_DETECTORS]
    names = [s.strip() for item in ([spec] if isinstance(spec, str) else spec) for s in item.split(",") if s.strip()]
    for n in names:
        get_detector_class(n)  # unknown -> one line listing the known ones
    return names


def run_demo(out: str | Path = "demo_out", store: str | None = None, backbone: str = "texture-filterbank",
             weights: str | None = None, C: int = 1024, k: int = 16, epochs: float = 5.0, seed: int = 0,
             preset: str | None = None, preprocess: str | None = None, detectors: str | Sequence[str] = "all",
             shots: int = 4, corruptions: int = 2, num_cpus: int | None = None, synth: dict[str, Any] | None = None,
             params: dict[str, dict[str, Any]] | None = None, echo: Callable[[str], None] = print) -> pd.DataFrame:
    """Run the demo; returns the summary (fractions and seconds, indexed by direction and method).

    ``synth``: keyword arguments for :func:`spg_dist.data.synth.synthesize` (a smaller demo); ``preprocess``: the SAE
    token preprocessing (default: the one the guide preset goes with); ``params``: per-detector settings on top of
    :data:`DEMO_PARAMS`.
    """
    from spg_dist.backbones import get_config
    from spg_dist.data.synth import synthesize
    from spg_dist.guides.config import PRESET_PREPROCESSING
    from spg_dist.ray.encode import encode
    from spg_dist.ray.extract import backbone_id_for, extract
    from spg_dist.ray.runtime import ensure_ray
    from spg_dist.ray.train_sae import train_saes
    from spg_dist.stages.detect import detect
    from spg_dist.store.atoms import top_patches
    from spg_dist.viz import atom_gallery_png

    t0 = time.perf_counter()
    names = parse_detectors(detectors)
    out_dir = Path(out)
    s = Store(store or out_dir / "store")
    reports = out_dir / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    ensure_ray(num_cpus=num_cpus)
    datasets = {}
    for layout in ("mvtec", "visa"):
        root = out_dir / "data" / f"synth_{layout}"
        if not (root / ".complete").exists():
            synthesize(root, layout=layout, seed=seed, **(synth or {}))
            (root / ".complete").write_text("ok\n")
        r = extract(s, f"{layout}:{root}", backbone, weights=weights,
                    corruptions=corruptions if "foundad" in names else 0, progress=False)
        datasets[layout] = root.name
        echo(f"[extract] {r.summary()}")
    bid = backbone_id_for(backbone, weights)
    layer = get_config(backbone).num_layers
    preset = preset or ("classical" if get_config(backbone).family == "classical" else "paper")
    preprocess = preprocess or PRESET_PREPROCESSING[preset]
    settings = {n: {**DEMO_PARAMS.get(n, {}), **(params or {}).get(n, {})} for n in names}

    rows = []
    for aux, target in ((datasets["visa"], datasets["mvtec"]), (datasets["mvtec"], datasets["visa"])):
        direction = f"{aux} -> {target}"
        sae = None
        if "spg" in names:
            trained = train_saes(s, bid, layer, Cs=[C], ks=[k], dataset=[aux], split=None, epochs=epochs,
                                 batch_tokens=1024, log_every=50, checkpoint_every=200, seed=seed,
                                 preprocess=preprocess)
            sae = trained.models[0]
            echo(f"[train-sae] {direction}: {sae['sae_id']} nmse {sae['nmse']:.3f}, dead "
                 f"{100 * sae['dead_fraction']:.1f}%")
        for name in names:
            p = dict(settings[name])
            if name == "spg":
                p.update(sae=sae["sae_id"], preset=preset)
            t_method = time.perf_counter()
            result = detect(s, name, target, backbone=bid, aux=[aux], params=p,
                            shots=shots if name in ("knn", "lake", "foundad") else None, echo=echo)
            seconds = time.perf_counter() - t_method  # fit (guides, projector, tokens) + scoring + metrics
            label = LABELS.get(name, name).format(shots=shots)
            rows.append({"direction": direction, "method": label, **result.mean, "seconds": seconds})
            result.table.to_csv(reports / f"{name}_{aux}_to_{target}.csv")
            echo(f"[{name}] {direction}: " + " ".join(f"{METRIC_NAMES[m]} {100 * result.mean[m]:.1f}"
                                                        for m in METRIC_NAMES) + f" ({seconds:.1f} s)")
            if name == "spg":
                _galleries(s, sae["sae_id"], result.extra["guide_id"], aux, direction, reports, encode, top_patches,
                           atom_gallery_png, echo)

    summary = pd.DataFrame(rows).set_index(["direction", "method"])
    summary = summary[list(METRIC_NAMES) + ["seconds"]].rename(columns=METRIC_NAMES)
    summary.to_csv(reports / "table1.csv")
    shown = format_summary(summary)
    (reports / "table1.md").write_text(shown)
    echo("\nZero-shot cross-dataset summary (mean over target categories, %; seconds per method and direction):")
    echo(shown)
    echo(f"\n[store] {s.uri}: " + ", ".join(f"{t}={n}" for t, n in s.counts().items() if n))
    echo(f"[reports] {reports} (table1.csv, per-method CSVs, atom galleries)")
    echo(f"[demo] done in {time.perf_counter() - t0:.0f} s")
    return summary


def format_summary(summary: pd.DataFrame) -> str:
    shown = summary.copy()
    metric_cols = [c for c in shown.columns if c != "seconds"]
    shown[metric_cols] = (100 * shown[metric_cols]).round(1)
    shown["seconds"] = shown["seconds"].round(1)
    return shown.to_string()


def _galleries(store, sae_id, guide_id, aux, direction, reports, encode, top_patches, atom_gallery_png, echo) -> None:
    """Encode the auxiliary tokens and draw the two strongest anomaly atoms of the guides."""
    from spg_dist.store import guides

    if not guide_id:
        return
    row = guides.get(store, guide_id)
    e = encode(store, sae_id, dataset=[aux], progress=False)
    strongest = sorted(zip(row["anomaly_values"], row["anomaly_indices"]), reverse=True)[:2]
    for value, atom in strongest:
        top = top_patches(store, sae_id, int(atom), 8)
        path = atom_gallery_png(store, sae_id, int(atom), top, reports / f"anomaly_atom_{aux}_{atom}.png")
        echo(f"[atoms] {direction}: anomaly atom {atom} (coefficient {value:.3f}) -> {path}")
    echo(f"[encode] {e.summary()}")


__all__ = ["DEFAULT_DETECTORS", "DEMO_PARAMS", "format_summary", "parse_detectors", "run_demo"]
