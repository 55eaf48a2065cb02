"""``spg sweep`` (+ ``report``) and ``spg reproduce``: declarative plans run across a Ray cluster."""

from __future__ import annotations

import json

import click

from spg_dist.cli.base import (DEFAULT_STORE, _apply, local_path, main, on_cluster, run_options,
                               start_ray, store_path, weights_path)


def sweep_options(f):
    """Options of ``spg sweep``, shared with ``jobs/sweep.py``."""
    opts = [
        click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
                     help="Sweep YAML (see configs/sweep-demo.yaml): the grid, data, stage1 settings, resources."),
        click.option("--store", default=None,
                     help=f"Store URI (default: the config's store:, else {DEFAULT_STORE})."),
        click.option("--dry-run", is_flag=True, help="Print the resolved plan (every trial) as JSON and exit."),
        click.option("--no-retry-failed", is_flag=True, help="Leave failed trials as they are (default: retry them)."),
        *run_options(),
    ]
    return _apply(opts, f)


@main.group("sweep", invoke_without_command=True)
@sweep_options
@click.pass_context
def sweep_group(ctx: click.Context, config_path, store, dry_run, no_retry_failed, address, num_cpus, quiet,
                verbose) -> None:
    """Run a grid of trials (backbones x layers x C x k x guides x pooling x directions x seeds x detectors)
    concurrently on Ray, shared work done once; a re-run skips finished trials and retries failed ones.
    `spg sweep --config FILE` runs; `spg sweep report SWEEP_ID` draws the tables and figures."""
    if ctx.invoked_subcommand is not None:
        return
    if not config_path:
        raise click.UsageError("pass --config FILE.yaml (or a subcommand: report SWEEP_ID)")
    run_sweep_command(config_path, store, dry_run, no_retry_failed, address, num_cpus, quiet, verbose)


@click.command("sweep", cls=type(main).command_class)
@sweep_options
def sweep_cmd(config_path, store, dry_run, no_retry_failed, address, num_cpus, quiet, verbose) -> None:
    """Run every unfinished trial of a sweep config (the job twin of `spg sweep --config`)."""
    if not config_path:
        raise click.UsageError("pass --config FILE.yaml")
    run_sweep_command(config_path, store, dry_run, no_retry_failed, address, num_cpus, quiet, verbose)


def run_sweep_command(config_path, store, dry_run, no_retry_failed, address, num_cpus, quiet, verbose=False) -> None:
    from spg_dist.stages.plans import load_sweep

    plan = load_sweep(config_path)
    if dry_run:
        click.echo(json.dumps(plan.describe(), indent=1, default=str))
        return
    from spg_dist.ray.sweep import run_sweep

    cluster = on_cluster(address)
    store = store_path(store or plan.store or DEFAULT_STORE, cluster, must_exist=False,
                       option="--store" if store else "store: (of the config)")
    start_ray(address, num_cpus, verbose)
    result = run_sweep(store, plan, address=address, num_cpus=num_cpus,
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

    store = store_path(store, cluster=False)
    paths = report(store, sweep_id, out or f"sweep_reports/{sweep_id}")
    click.echo(paths["table"])
    for key, value in paths.items():
        if key in ("table",):
            continue
        for v in (value if isinstance(value, list) else [value]):
            click.echo(f"{key}: {v}")


def _run_options(f):
    return _apply(run_options(), f)


@main.command("reproduce")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Reproduction plan: configs/paper.yaml (the paper's settings) or configs/paper-demo.yaml.")
@click.option("--data", "data", multiple=True,
              help="NAME=PATH: the folder on disk of the dataset the plan calls NAME (its layout comes from the plan; "
                   "this is not a stored dataset name), e.g. mvtec=/data/mvtec_ad, visa=/data/visa; repeatable.")
@click.option("--weights", "weights", multiple=True,
              help="BACKBONE=PATH of local weights for a backbone of the plan (dinov3-vitl16=/models/dinov3); "
                   "repeatable.")
@click.option("--seeds", type=int, default=None, help="How many seeds (mean ± std over them; default: the plan's).")
@click.option("--store", default=None, help="Store URI (default: the plan's).")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Folder for the tables (CSV/Markdown; default: reproduce_out/<plan name>).")
@click.option("--dry-run", is_flag=True, help="Print the resolved plan (every setting) and its estimated cost.")
@_run_options
def reproduce_cmd(config_path, data, weights, seeds, store, out, dry_run, address, num_cpus, quiet, verbose) -> None:
    """Reproduce the paper's Table 1 and per-category tables with one command: extraction, Stage 1, Stage 2 and
    evaluation in both directions, mean ± std over seeds, beside the paper's numbers."""
    from spg_dist.stages.reproduce import load_reproduction, reproduce

    cluster = on_cluster(address) and not dry_run

    def pair(item: str, option: str, check) -> str:
        name, sep, value = item.partition("=")
        return f"{name}={check(value, f'{option} {name}')}" if sep and value else item

    data = tuple(pair(d, "--data", lambda v, o: local_path(v, o, cluster)) for d in data)
    weights = tuple(pair(w, "--weights", lambda v, o: weights_path(v, cluster, o)) for w in weights)
    plan = load_reproduction(config_path, data=data, weights=weights, seeds=seeds, store=store)
    if dry_run:
        click.echo(json.dumps(plan.describe(), indent=1, default=str))
        return
    if cluster:
        store_path(plan.store, cluster, must_exist=False, option="--store" if store else "store: (of the plan)")
    start_ray(address, num_cpus, verbose)
    result = reproduce(plan, out=out, address=address, num_cpus=num_cpus, echo=click.echo, progress=not quiet)
    click.echo(result.table1_text)
    for path in result.files:
        click.echo(f"wrote {path}")
