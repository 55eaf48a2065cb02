"""Stage 2 and every detector: ``spg train-guides``, ``spg evaluate`` (SPG's guides), ``spg detect`` (any detector),
``spg detectors`` (the registry)."""

from __future__ import annotations

from pathlib import Path

import click

from spg_dist.cli.base import (DEFAULT_STORE, _apply, _str_list, check_datasets, check_detector, check_guides,
                               check_sae, main, on_cluster, run_options, start_ray, store_path)


def train_guides_options(f):
    """Options of ``spg train-guides``, shared with ``jobs/train_guides.py``."""
    opts = [
        click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URI."),
        click.option("--sae", "sae_id", required=True, help="sae_id of the frozen SAE (see `spg saes`)."),
        click.option("--aux", "aux", required=True, callback=_str_list,
                     help="Auxiliary dataset name(s) with masks (comma-separated), e.g. synth_visa."),
        click.option("--preset", type=click.Choice(["paper", "classical"]), default="paper", show_default=True,
                     help="paper: focal+Dice, T=0.07, lr 1e-3, 5000 steps, plain EMA 0.999, cos(f, g); classical: "
                          "balanced BCE+Dice, T=0.2, lr 1e-2, 150 steps, EMA warm-up."),
        click.option("--steps", type=int, default=None, help="Optimizer steps (default: the preset's)."),
        click.option("--lr", type=float, default=None, help="Adam learning rate (default: the preset's)."),
        click.option("--temperature", type=float, default=None, help="Softmax temperature T (default: the preset's)."),
        click.option("--nonneg", type=click.Choice(["relu", "topk"]), default=None, help="Non-negativity of z."),
        click.option("--k-g", type=int, default=None, help="Coefficients kept with --nonneg topk."),
        click.option("--subtract-b-pre/--no-subtract-b-pre", default=None,
                     help="Score cos(f - b_pre, g) instead of the paper's cos(f, g) (Eq. 9). Default: the preset's "
                          "(paper: off)."),
        click.option("--ema-warmup/--no-ema-warmup", default=None,
                     help="Warm the EMA up (min(0.999, (1+t)/(10+t))) instead of the paper's plain 0.999 EMA. "
                          "Default: the preset's (paper: off, classical: on)."),
        click.option("--mask-size", type=int, default=None, help="Mask resolution for the loss (default grid x 4)."),
        *run_options(in_process=True),
    ]
    return _apply(opts, f)


@main.command("train-guides")
@train_guides_options
def train_guides_cmd(store, sae_id, aux, preset, steps, lr, temperature, nonneg, k_g, subtract_b_pre, ema_warmup,
                     mask_size, address, num_cpus, quiet, verbose) -> None:
    """Stage 2: learn normal/anomaly guides over a frozen SAE's dictionary on an auxiliary dataset with masks, and
    register them in the guides table (re-running the same settings returns the stored guides)."""
    import dataclasses

    from spg_dist.guides import GuideConfig
    from spg_dist.stages.guides import train_guides

    store = store_path(store, on_cluster(address))
    check_sae(store, sae_id)
    check_datasets(store, aux, "--aux")
    cfg = GuideConfig.preset(preset)
    overrides = {k: v for k, v in dict(steps=steps, lr=lr, temperature=temperature, nonneg=nonneg, k_g=k_g,
                                       subtract_b_pre=subtract_b_pre, ema_warmup=ema_warmup).items()
                 if v is not None}
    g = train_guides(store, sae_id, aux, dataclasses.replace(cfg, **overrides), mask_size=mask_size)
    click.echo(f"guides {g.guide_id}: active sets normal {g.active_normal}, anomaly {g.active_anomaly} after "
               f"{g.steps} steps{' (already stored)' if g.reused else ''}")


def report_options() -> list:
    return [
        click.option("--resolution", default=None,
                     help="What the anomaly maps and masks are compared at: a side in px (square), 'input' (the "
                          "extraction size), or 'native' (each image and its full-resolution mask at their own size, "
                          "as the paper does). Default: 4 x the token grid."),
        click.option("--run", default=None,
                     help="Run name of the eval_results rows (default: detector, backbone, layers and a hash of the "
                          "settings, so a re-run replaces its rows)."),
        click.option("--allow-overlap", is_flag=True,
                     help="Evaluate even if target categories occur in data the model was trained on (not zero-shot)."),
        click.option("--report", "report_dir", default=None, type=click.Path(file_okay=False),
                     help="Write metrics.csv, metrics.md, overlays/*.png (and tau_sweep.*) into this folder."),
        click.option("--overlays", type=click.IntRange(min=0), default=8, show_default=True,
                     help="Overlay PNGs per category with --report (anomalous images first)."),
        click.option("--taus", default=None,
                     help="Comma list of τ, e.g. 0.01,0.05,0.1,0.5: image AUROC/AP of lse:τ pooling against τ."),
    ]


def _echo(quiet: bool):
    """Progress lines of a stage: shown unless -q."""
    return (lambda _line: None) if quiet else click.echo


def _taus(value: str | None):
    from spg_dist.viz.sweeps import parse_taus

    try:
        return parse_taus(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--taus") from None


def echo_result(result) -> None:
    """The per-category table (%), the τ sweep and the report paths of an EvalResult."""
    note = result.extra.get("note")
    if note:
        click.echo(f"note: {note}")
    click.echo(f"{result.detector} on {result.target_dataset} (backbone {result.backbone}, layers "
               f"{','.join(map(str, result.layers)) or '-'}, pooling {result.pooling}, maps at {result.resolution} px; "
               f"run {result.run}; {result.seconds:.1f} s)")
    click.echo((100 * result.table).round(1).to_string())
    sweep = result.tau_sweep
    if sweep is not None and len(sweep):
        first = sweep.iloc[0]
        click.echo("\nmean image AUROC / AP against τ (lse pooling; max pooling: "
                   f"{100 * first['max_image_auroc']:.1f} / {100 * first['max_image_ap']:.1f})")
        for _, r in sweep.iterrows():
            click.echo(f"  τ={r['tau']:<10g} {100 * r['image_auroc']:6.1f} {100 * r['image_ap']:6.1f}")
    rep = result.report
    if rep:
        click.echo("")
        for key in ("metrics_csv", "metrics_md", "tau_sweep_csv", "tau_sweep_png"):
            if key in rep:
                click.echo(f"wrote {rep[key]}")
        if rep.get("overlays"):
            click.echo(f"wrote {len(rep['overlays'])} overlays in {Path(rep['overlays'][0]).parent}")


def evaluate_options(f):
    """Options of ``spg evaluate``, shared with ``jobs/evaluate.py``."""
    opts = [
        click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URI."),
        click.option("--guides", "guide_id", required=True, help="guide_id from `spg train-guides`."),
        click.option("--target", "target_dataset", required=True, help="Target dataset name (zero-shot)."),
        click.option("--pooling", default="max", show_default=True, help="Image score: max, mean or lse:TAU."),
        *report_options(),
        *run_options(in_process=True),
    ]
    return _apply(opts, f)


@main.command("evaluate")
@evaluate_options
def evaluate_cmd(store, guide_id, target_dataset, pooling, resolution, run, allow_overlap, report_dir, overlays,
                 taus, address, num_cpus, quiet, verbose) -> None:
    """Zero-shot evaluation of stored guides on a target dataset (SPG through the same loop as every detector:
    `spg detect --method spg --param guides=ID`): image AUROC/AP, pixel AUROC, AUPRO per category and their mean,
    written to eval_results; optionally a report folder and a τ sweep of lse pooling."""
    from spg_dist.evaluation import parse_pooling
    from spg_dist.stages.detect import detect

    try:
        parse_pooling(pooling)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--pooling") from None
    store = store_path(store, on_cluster(address))
    check_guides(store, guide_id)
    check_datasets(store, [target_dataset], "--target")
    start_ray(address, num_cpus, verbose)
    result = detect(store, "spg", target_dataset, params={"guides": guide_id, "pooling": pooling},
                    resolution=resolution, run=run, allow_overlap=allow_overlap, report_dir=report_dir,
                    overlays=overlays, taus=_taus(taus), address=address, num_cpus=num_cpus,
                    echo=_echo(quiet))
    echo_result(result)


def _params(_ctx, _param, values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--param")
        out[key.strip()] = value.strip()
    return out


def detect_options(f):
    """Options of ``spg detect``, shared with ``jobs/detect.py``."""
    opts = [
        click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URI."),
        click.option("--method", required=True,
                     help="Detector name: spg, knn, musc, lake, foundad, visualad (`spg detectors` lists them with "
                          "their settings)."),
        click.option("--target", required=True, help="Target dataset name, as `spg evaluate --target` takes it; "
                                                     "its test split is scored."),
        click.option("--aux", default=None, callback=_str_list,
                     help="Labelled auxiliary dataset(s) a zero-shot method trains on (spg, visualad)."),
        click.option("--shots", type=int, default=None,
                     help="Normal train images per target category for few-shot methods (knn, lake, foundad)."),
        click.option("--backbone", default=None,
                     help="Backbone id of the stored tokens to read (default: the only one the target has)."),
        click.option("--param", "params", multiple=True, callback=_params,
                     help="A detector setting KEY=VALUE (repeatable), e.g. --param sae=ID for spg, "
                          "--param index=approximate for knn, --param steps=500 for foundad."),
        *report_options(),
        click.option("--workers", type=int, default=1, show_default=True,
                     help="Ray Train workers for detectors that train (foundad); 1 trains in this process."),
        click.option("--device", default="cpu", show_default=True, help="Torch device for scoring."),
        *run_options(),
    ]
    return _apply(opts, f)


@main.command("detect")
@detect_options
def detect_cmd(store, method, target, aux, shots, backbone, params, resolution, run, allow_overlap, report_dir,
               overlays, taus, workers, device, address, num_cpus, quiet, verbose) -> None:
    """Run any registered detector on the stored tokens of a target dataset with the one evaluation loop (the same
    maps, masks, resolution and metrics for every method) and write its eval_results rows. Trainable detectors
    reuse weights already fitted on the same data."""
    from spg_dist.stages.detect import detect

    store = store_path(store, on_cluster(address))
    check_detector(method)
    check_datasets(store, [target], "--target")
    check_datasets(store, aux, "--aux")
    start_ray(address, num_cpus, verbose)
    result = detect(store, method, target, backbone=backbone, aux=aux, shots=shots, params=params,
                    resolution=resolution, run=run, allow_overlap=allow_overlap, report_dir=report_dir,
                    overlays=overlays, taus=_taus(taus), device=device, workers=workers, address=address,
                    num_cpus=num_cpus, echo=_echo(quiet))
    echo_result(result)


@main.command("detectors")
def detectors_cmd() -> None:
    """List the detector registry: what each reads and its settings (for --param)."""
    import dataclasses

    from spg_dist.detectors import get_detector_class, list_detectors

    for name in list_detectors():
        cls = get_detector_class(name)
        det = cls()
        i = det.inputs()
        reads = [w for w, on in (("aux dataset", i.aux), (f"{i.shots} shots", i.shots),
                                 ("unlabelled target", i.unlabelled_target), ("corrupted shots", i.corruptions),
                                 ("image files", i.images)) if on] or ["target tokens only"]
        click.echo(f"{name:9s} {cls.summary}")
        click.echo(f"{'':9s} reads: {', '.join(reads)}; fitted per {i.scope}; image score {det.pooling} over the "
                   f"{'map' if det.pool_on == 'map' else 'patch grid'}")
        settings = ", ".join(f"{f.name}={getattr(det.settings, f.name)!r}" for f in dataclasses.fields(det.settings))
        click.echo(f"{'':9s} settings: {settings}")
