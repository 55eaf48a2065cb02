"""Stage 2 commands: ``spg train-guides``, ``spg evaluate``."""

from __future__ import annotations

from pathlib import Path

import click

from spg_dist.cli.base import DEFAULT_STORE, _apply, _str_list, main


def train_guides_options(f):
    """Options of ``spg train-guides``, shared with ``jobs/train_guides.py``."""
    opts = [
        click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URI."),
        click.option("--sae", "sae_id", required=True, help="sae_id of the frozen SAE (see `spg saes`)."),
        click.option("--aux", "aux", required=True, callback=_str_list,
                     help="Auxiliary dataset name(s) with masks (comma-separated), e.g. synth_visa."),
        click.option("--preset", type=click.Choice(["paper", "classical"]), default="paper", show_default=True,
                     help="paper: focal+Dice, T=0.07, lr 1e-3; classical: balanced BCE+Dice, T=0.2, lr 1e-2, 150 steps."),
        click.option("--steps", type=int, default=None, help="Optimizer steps (default: the preset's)."),
        click.option("--lr", type=float, default=None, help="Adam learning rate (default: the preset's)."),
        click.option("--temperature", type=float, default=None, help="Softmax temperature T (default: the preset's)."),
        click.option("--nonneg", type=click.Choice(["relu", "topk"]), default=None, help="Non-negativity of z."),
        click.option("--k-g", type=int, default=None, help="Coefficients kept with --nonneg topk."),
        click.option("--mask-size", type=int, default=None, help="Mask resolution for the loss (default grid x 4)."),
    ]
    return _apply(opts, f)


@main.command("train-guides")
@train_guides_options
def train_guides_cmd(store, sae_id, aux, preset, steps, lr, temperature, nonneg, k_g, mask_size) -> None:
    """Stage 2: learn normal/anomaly guides over a frozen SAE's dictionary on an auxiliary dataset with masks, and
    register them in the guides table (re-running the same settings returns the stored guides)."""
    import dataclasses

    from spg_dist.distributed.stage2 import train_guides
    from spg_dist.guides import GuideConfig

    cfg = GuideConfig.preset(preset)
    overrides = {k: v for k, v in dict(steps=steps, lr=lr, temperature=temperature, nonneg=nonneg, k_g=k_g).items()
                 if v is not None}
    row = train_guides(store, sae_id, aux, dataclasses.replace(cfg, **overrides), mask_size=mask_size)
    click.echo(f"guides {row['guide_id']}: active sets normal {row['active_normal']}, anomaly {row['active_anomaly']}"
               f" after {row['steps']} steps")


def evaluate_options(f):
    """Options of ``spg evaluate``, shared with ``jobs/evaluate.py``."""
    opts = [
        click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URI."),
        click.option("--guides", "guide_id", required=True, help="guide_id from `spg train-guides`."),
        click.option("--target", "target_dataset", required=True, help="Target dataset name (zero-shot)."),
        click.option("--pooling", default="max", show_default=True, help="Image score: max, mean or lse:TAU."),
        click.option("--allow-overlap", is_flag=True,
                     help="Evaluate even if target categories also occur in the auxiliary data (not zero-shot)."),
        click.option("--run", default=None, help="Run name of the eval_results rows (default: <guides>@<pooling>)."),
        click.option("--report", "report_dir", default=None, type=click.Path(file_okay=False),
                     help="Write metrics.csv, metrics.md, overlays/*.png (and tau_sweep.*) into this folder."),
        click.option("--overlays", type=click.IntRange(min=0), default=8, show_default=True,
                     help="Overlay PNGs per category with --report (anomalous images first)."),
        click.option("--taus", default=None,
                     help="Comma list of τ, e.g. 0.01,0.05,0.1,0.5: image AUROC/AP of lse:τ pooling against τ."),
    ]
    return _apply(opts, f)


@main.command("evaluate")
@evaluate_options
def evaluate_cmd(store, guide_id, target_dataset, pooling, allow_overlap, run, report_dir, overlays, taus) -> None:
    """Zero-shot evaluation of stored guides on a target dataset: image AUROC/AP, pixel AUROC, AUPRO per category
    and their mean, written to eval_results; optionally a report folder and a τ sweep of lse pooling."""
    from spg_dist.distributed.stage2 import evaluate
    from spg_dist.viz.sweeps import parse_taus

    try:
        tau_list = parse_taus(taus)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--taus") from None
    table = evaluate(store, guide_id, target_dataset, pooling=pooling, allow_overlap=allow_overlap, run=run,
                     report_dir=report_dir, overlays=overlays, taus=tau_list)
    click.echo((100 * table).round(1).to_string())
    sweep = table.attrs.get("tau_sweep")
    if sweep:
        click.echo("\nmean image AUROC / AP against τ (lse pooling; max pooling: "
                   f"{100 * sweep[0]['max_image_auroc']:.1f} / {100 * sweep[0]['max_image_ap']:.1f})")
        for r in sweep:
            click.echo(f"  τ={r['tau']:<10g} {100 * r['image_auroc']:6.1f} {100 * r['image_ap']:6.1f}")
    rep = table.attrs.get("report")
    if rep:
        click.echo("")
        for key in ("metrics_csv", "metrics_md", "tau_sweep_csv", "tau_sweep_png"):
            if key in rep:
                click.echo(f"wrote {rep[key]}")
        if rep.get("overlays"):
            click.echo(f"wrote {len(rep['overlays'])} overlays in {Path(rep['overlays'][0]).parent}")
