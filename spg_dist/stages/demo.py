"""``spg demo``: the project's main job end to end on data it makes itself, re-using whatever the store holds.

Synthesise two datasets with disjoint categories (MVTec and VisA layouts) and extract both (plus CutPaste-corrupted
copies of the normal train images for FoundAD); then in each direction (aux -> target): train a TopK SAE on the
auxiliary tokens with Ray Train, and evaluate every chosen detector on the target through the one evaluation loop:
SPG's guides (trained on the auxiliary masks, zero-shot), and the other detectors on the same stored tokens
(few-shot kNN, LAKE and FoundAD, label-free MuSc, zero-shot VisualAD with a ViT of its own). Prints one table of
every method (the same, digit for digit, on every run with the same seed; wall times follow in a table of their
own), writes atom galleries of SPG's strongest anomaly atoms and, per direction, one figure of a few target images
with every method's anomaly map side by side. Every stage is idempotent, so a re-run only does what is missing.

Determinism: nothing here depends on the order in which Ray writes rows (every reader sorts by ``image_id``), every
random draw is seeded from ``seed`` and the driver runs torch with deterministic algorithms; the SAE is trained by
one Ray Train worker (DDP over one rank), so its float reductions run in one fixed order.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from spg_dist.store import Store

METRIC_NAMES = {"image_auroc": "img AUROC", "image_ap": "img AP", "pixel_auroc": "px AUROC", "aupro": "AUPRO"}
DEFAULT_DETECTORS = ("spg", "knn", "musc", "lake", "foundad", "visualad")
LABELS = {"spg": "SPG (ours, zero-shot)", "knn": "kNN {shots}-shot", "musc": "MuSc (label-free)",
          "lake": "LAKE {shots}-shot", "foundad": "FoundAD {shots}-shot", "visualad": "VisualAD (zero-shot)"}
# settings that keep every detector within the demo's budget on 2 CPU cores (recorded with every result)
DEMO_PARAMS: dict[str, dict[str, Any]] = {"foundad": {"steps": 300, "width": 128, "heads": 4, "depth": 6},
                                          "visualad": {"epochs": 2, "image_size": 112}}
OVERLAY_IMAGES = 4  # anomalous target images per direction in the side-by-side overlay figure


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
             params: dict[str, dict[str, Any]] | None = None, echo: Callable[[str], None] = print,
             address: str | None = None, quiet: bool = False, verbose: bool = False,
             overlays: int = OVERLAY_IMAGES) -> pd.DataFrame:
    """Run the demo; returns the summary (fractions and seconds, indexed by direction and method).

    ``synth``: keyword arguments for :func:`spg_dist.data.synth.synthesize` (a smaller demo); ``preprocess``: the SAE
    token preprocessing (default: the one the guide preset goes with); ``params``: per-detector settings on top of
    :data:`DEMO_PARAMS`. ``address``/``num_cpus``: the Ray cluster to join, or the size of the local one;
    ``quiet``: only the tables and where things went; ``verbose``: Ray's own logs too. ``overlays``: anomalous target
    images per direction drawn with every method's map side by side (0: none).
    """
    from spg_dist.ray.runtime import configure_ray

    t0 = time.perf_counter()
    names = parse_detectors(detectors)
    out_dir = Path(out)
    s = Store(store or out_dir / "store")
    reports = out_dir / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    say = (lambda _: None) if quiet else echo  # stage lines; the tables and paths are always printed
    # one Ray runtime for every stage, started by the first stage with work left (a re-run with nothing to do
    # starts none); each stage joins it with these settings
    configure_ray(verbose=verbose)
    with _deterministic(seed):
        rows = _run(s, out_dir, reports, names, backbone, weights, C, k, epochs, seed, preset, preprocess, shots,
                    corruptions, synth, params, say, echo, address, num_cpus, overlays)

    summary = pd.DataFrame(rows).set_index(["direction", "method"])
    summary = summary[list(METRIC_NAMES) + ["seconds"]].rename(columns=METRIC_NAMES)
    summary.to_csv(reports / "table1.csv")
    shown = format_summary(summary)
    (reports / "table1.md").write_text(shown)
    echo(f"\n{TABLE_TITLE}")
    echo(shown)
    echo(f"\n{TIMES_TITLE}")
    echo(format_seconds(summary))
    echo(f"\n[store] {store or out_dir / 'store'}: " + ", ".join(f"{t}={n}" for t, n in s.counts().items() if n))
    echo(f"[reports] {reports} (table1.csv, per-method CSVs, atom galleries, overlays/)")
    echo(f"[demo] done in {time.perf_counter() - t0:.0f} s")
    return summary


TABLE_TITLE = "Zero-shot cross-dataset summary (mean over target categories, %):"
TIMES_TITLE = "Wall time per method and direction (seconds; varies from run to run):"
@contextlib.contextmanager
def _deterministic(seed: int):
    """Seeded global RNGs and torch's deterministic algorithms on the driver for the demo's duration (restored
    after: a library call should not change its caller's settings). Detectors and trainers seed their own
    generators; this covers anything that draws from the global ones."""
    import random

    import numpy as np
    import torch

    was = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    state = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.random.set_rng_state(state[2])


def _run(s, out_dir, reports, names, backbone, weights, C, k, epochs, seed, preset, preprocess, shots, corruptions,
         synth, params, say, echo, address, num_cpus, overlays) -> list[dict[str, Any]]:
    from spg_dist.backbones import get_config
    from spg_dist.data.synth import synthesize
    from spg_dist.guides.config import PRESET_PREPROCESSING
    from spg_dist.ray.encode import encode
    from spg_dist.ray.extract import backbone_id_for, extract
    from spg_dist.ray.train_sae import train_saes
    from spg_dist.stages.detect import detect
    from spg_dist.store.atoms import top_patches
    from spg_dist.viz import atom_gallery_png

    datasets = {}
    for layout in ("mvtec", "visa"):
        root = out_dir / "data" / f"synth_{layout}"
        if not (root / ".complete").exists():
            synthesize(root, layout=layout, seed=seed, **(synth or {}))
            (root / ".complete").write_text("ok\n")
        r = extract(s, f"{layout}:{root}", backbone, weights=weights,
                    corruptions=corruptions if "foundad" in names else 0, progress=False, address=address,
                    num_cpus=num_cpus)
        datasets[layout] = root.name
        say(f"[extract] {r.summary()}")
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
                                 preprocess=preprocess, address=address, num_cpus=num_cpus)
            sae = trained.models[0]
            say(f"[train-sae] {direction}: {sae['sae_id']} nmse {sae['nmse']:.3f}, dead "
                 f"{100 * sae['dead_fraction']:.1f}%")
        shown_ids = _overlay_images(s, target, overlays) if overlays else []
        keep = {"keep_maps": shown_ids} if shown_ids and _detect_keeps_maps(detect) else {}
        maps: dict[str, list] = {}
        for name in names:
            p = dict(settings[name])
            if name == "spg":
                p.update(sae=sae["sae_id"], preset=preset)
            t_method = time.perf_counter()
            result = detect(s, name, target, backbone=bid, aux=[aux], params=p,
                            shots=shots if name in ("knn", "lake", "foundad") else None, echo=say,
                            address=address, num_cpus=num_cpus, **keep)
            seconds = time.perf_counter() - t_method  # fit (guides, projector, tokens) + scoring + metrics
            label = LABELS.get(name, name).format(shots=shots)
            rows.append({"direction": direction, "method": label, **result.mean, "seconds": seconds})
            if keep and all(i in result.extra.get("maps", {}) for i in shown_ids):
                maps[label] = [result.extra["maps"][i] for i in shown_ids]
            result.table.to_csv(reports / f"{name}_{aux}_to_{target}.csv")
            say(f"[{name}] {direction}: " + " ".join(f"{METRIC_NAMES[m]} {100 * result.mean[m]:.1f}"
                                                        for m in METRIC_NAMES) + f" ({seconds:.1f} s)")
            if name == "spg":
                _galleries(s, sae["sae_id"], result.extra["guide_id"], aux, direction, reports, encode, top_patches,
                           atom_gallery_png, say, address, num_cpus)
        if overlays:
            _write_overlays(s, target, direction, shown_ids, maps, reports / "overlays" / f"{aux}_to_{target}.png",
                            keep, echo)
    return rows


def format_summary(summary: pd.DataFrame) -> str:
    """The metrics of a summary as printed: percent, one decimal, no wall times (deterministic for a seed)."""
    shown = summary.drop(columns=[c for c in ("seconds",) if c in summary.columns])
    return (100 * shown).round(1).to_string()


def format_seconds(summary: pd.DataFrame) -> str:
    """Wall seconds per method (rows) and direction (columns), one decimal."""
    table = summary["seconds"].round(1).unstack("direction")
    directions = list(dict.fromkeys(summary.index.get_level_values("direction")))
    methods = list(dict.fromkeys(summary.index.get_level_values("method")))
    return table.reindex(index=methods, columns=directions).to_string()


def _overlay_images(store: Store, target: str, n: int) -> list[str]:
    """Up to ``n`` anomalous test images of ``target``, one per category in turn (image_id order: the same on
    every run)."""
    from spg_dist.store import images

    rows = images.rows(store, dataset=target, columns=("image_id", "category", "split", "label")).to_pylist()
    by_cat: dict[str, list[str]] = {}
    for r in sorted(rows, key=lambda r: r["image_id"]):
        if r["split"] == "test" and r["label"] == 1:
            by_cat.setdefault(r["category"], []).append(r["image_id"])
    picked: list[str] = []
    for depth in range(max((len(v) for v in by_cat.values()), default=0)):
        for cat in sorted(by_cat):
            if len(picked) < n and depth < len(by_cat[cat]):
                picked.append(by_cat[cat][depth])
    return picked


def _detect_keeps_maps(detect) -> bool:
    return "keep_maps" in inspect.signature(detect).parameters


def _write_overlays(store: Store, target: str, direction: str, image_ids: list[str], maps: dict[str, list],
                    out_path: Path, keep: dict, echo: Callable[[str], None]) -> None:
    """One figure of ``image_ids`` with every method's anomaly map side by side (one column per method)."""
    try:
        from spg_dist.viz.overlays import method_overlays
    except ImportError:
        echo(f"[overlays] {direction}: skipped (spg_dist.viz.overlays.method_overlays is not available)")
        return
    if not keep or not maps:
        echo(f"[overlays] {direction}: skipped (this version of spg_dist.stages.detect.detect returns no maps: "
             f"it needs keep_maps)")
        return
    from spg_dist.stages.inputs import load_masks
    from spg_dist.store import images
    from spg_dist.viz.overlays import load_display_image

    side = max(224, int(np.asarray(next(iter(maps.values()))[0]).shape[-1]))  # maps are drawn to the image's extent
    uris = images.uris(store, target)
    pictures = []
    for i in image_ids:
        img = load_display_image(uris.get(i, ("", ""))[0], side)
        pictures.append(img if img is not None else np.zeros((side, side, 3), np.uint8))
    masks = list(load_masks(image_ids, uris, side))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    path = method_overlays(pictures, masks, maps, [i.split("/", 1)[-1] for i in image_ids], out_path)
    echo(f"[overlays] {direction}: {len(image_ids)} images x {len(maps)} methods -> {path}")


def _galleries(store, sae_id, guide_id, aux, direction, reports, encode, top_patches, atom_gallery_png, echo,
               address: str | None = None, num_cpus: int | None = None) -> None:
    """Encode the auxiliary tokens and draw the two strongest anomaly atoms of the guides."""
    from spg_dist.store import guides

    if not guide_id:
        return
    row = guides.get(store, guide_id)
    e = encode(store, sae_id, dataset=[aux], progress=False, address=address, num_cpus=num_cpus)
    strongest = sorted(zip(row["anomaly_values"], row["anomaly_indices"]), reverse=True)[:2]
    for value, atom in strongest:
        top = top_patches(store, sae_id, int(atom), 8)
        path = atom_gallery_png(store, sae_id, int(atom), top, reports / f"anomaly_atom_{aux}_{atom}.png",
                                role="anomaly-guide", coefficient=float(value))
        echo(f"[atoms] {direction}: anomaly atom {atom} (coefficient {value:.3f}) -> {path}")
    echo(f"[encode] {e.summary()}")


__all__ = ["DEFAULT_DETECTORS", "DEMO_PARAMS", "format_seconds", "format_summary", "parse_detectors", "run_demo"]
