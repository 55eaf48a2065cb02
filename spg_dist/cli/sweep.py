"""``spg sweep`` (+ ``report``) and ``spg reproduce``: declarative plans run across a Ray cluster."""

from __future__ import annotations

import json

import click

from spg_dist.cli.base import DEFAULT_STORE, _apply, main


def sweep_options(f):
    """Options of ``spg sweep``, shared with ``jobs/sweep.py``."""
    opts = [
        click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
                     help="Sweep YAML (see configs/sweep-demo.yaml): the grid, data, stage1 settings, resources."),
        click.option("--store", default=None,
                     help=f"Store URI (default: the config's store:, else {DEFAULT_STORE})."),
        click.option("--dry-run", is_flag=True, help="Print the resolved plan (every trial) as JSON and exit."),
        click.option("--no-retry-failed", is_flag=True, help="Leave failed trials as they are (default: retry them)."),
        click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)."),
        click.option("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    return _apply(opts, f)


@main.group("sweep", invoke_without_command=True)
@sweep_options
@click.pass_context
def sweep_group(ctx: click.Context, config_path, store, dry_run, no_retry_failed, address, num_cpus, quiet) -> None:
    """Run a grid of trials (backbones x layers x C x k x guides x pooling x directions x seeds x detectors)
    concurrently on Ray, shared work done once; a re-run skips finished trials and retries failed ones.
    `spg sweep --config FILE` runs; `spg sweep report SWEEP_ID` draws the tables and figures."""
    if ctx.invoked_subcommand is not None:
        return
    if not config_path:
        raise click.UsageError("pass --config FILE.yaml (or a subcommand: report SWEEP_ID)")
    run_sweep_command(config_path, store, dry_run, no_retry_failed, address, num_cpus, quiet)


@click.command("sweep")
@sweep_options
def sweep_cmd(config_path, store, dry_run, no_retry_failed, address, num_cpus, quiet) -> None:
    """Run every unfinished trial of a sweep config (the job twin of `spg sweep --config`)."""
    if not config_path:
        raise click.UsageError("pass --config FILE.yaml")
    run_sweep_command(config_path, store, dry_run, no_retry_failed, address, num_cpus, quiet)


def run_sweep_command(config_path, store, dry_run, no_retry_failed, address, num_cpus, quiet) -> None:
    from spg_dist.stages.plans import load_sweep

    plan = load_sweep(config_path)
    if dry_run:
        click.echo(json.dumps(plan.describe(), indent=1, default=str))
        return
    from spg_dist.ray.sweep import run_sweep

    result = run_sweep(store or plan.store or DEFAULT_STORE, plan, address=address, num_cpus=num_cpus,
                       retry_failed=not no_retry_failed, echo=click.echo, progress=not quiet)
    for tid, err in sorted(result.errors.items()):
        click.echo(f"failed {tid}: {err}", err=True)
    click.echo(result.summary())


@sweep_group.command("report")
@click.argument("sweep_id")
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URI.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Folder for summary.csv/.md and the figures (default: sweep_reports/<SWEEP_ID>).")
def sweep_report_cmd(sweep_id, store, out) -> None:
    """Tables and the paper's figures from a sweep's finished trials: (C, k) heatmaps per direction and metric,
    image AUROC/AP against τ, metrics per backbone, metrics against total guide sparsity."""
    from spg_dist.stages.sweep_report import report

    paths = report(store, sweep_id, out or f"sweep_reports/{sweep_id}")
    click.echo(paths["table"])
    for key, value in paths.items():
        if key in ("table",):
            continue
        for v in (value if isinstance(value, list) else [value]):
            click.echo(f"{key}: {v}")


@main.command("reproduce")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Reproduction plan: configs/paper.yaml (the paper's settings) or configs/paper-demo.yaml.")
@click.option("--data", "data", multiple=True,
              help="NAME=PATH of a dataset the plan names (mvtec=/data/mvtec_ad, visa=/data/visa); repeatable.")
@click.option("--weights", "weights", multiple=True,
              help="BACKBONE=PATH of local weights for a backbone of the plan (dinov3-vitl16=/models/dinov3); "
                   "repeatable.")
@click.option("--seeds", type=int, default=None, help="How many seeds (mean ± std over them; default: the plan's).")
@click.option("--store", default=None, help="Store URI (default: the plan's).")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Folder for the tables (CSV/Markdown; default: reproduce_out/<plan name>).")
@click.option("--dry-run", is_flag=True, help="Print the resolved plan (every setting) and its estimated cost.")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray).")
@click.option("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def reproduce_cmd(config_path, data, weights, seeds, store, out, dry_run, address, num_cpus, quiet) -> None:
    """Reproduce the paper's Table 1 and per-category tables with one command: extraction, Stage 1, Stage 2 and
    evaluation in both directions, mean ± std over seeds, beside the paper's numbers."""
    from spg_dist.stages.reproduce import load_reproduction, reproduce

    plan = load_reproduction(config_path, data=data, weights=weights, seeds=seeds, store=store)
    if dry_run:
        click.echo(json.dumps(plan.describe(), indent=1, default=str))
        return
    result = reproduce(plan, out=out, address=address, num_cpus=num_cpus, echo=click.echo, progress=not quiet)
    click.echo(result.table1_text)
    for path in result.files:
        click.echo(f"wrote {path}")
