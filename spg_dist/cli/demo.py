"""``spg demo``: the whole protocol on data it makes itself."""

from __future__ import annotations

import sys

import click

from spg_dist.cli.base import _apply, _steps, main, run_options


def _apply_run_options(f):
    return _apply(run_options(), f)


@main.command("demo")
@click.option("--store", default=None, help="Store URI (default: <out>/store).")
@click.option("--out", default="demo_out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the synthetic datasets, the store and the reports.")
@click.option("--backbone", default="texture-filterbank", show_default=True,
              help="Backbone registry name (default: the classical filter bank, the honest offline encoder).")
@click.option("--weights", default=None, help="Local weights for the backbone.")
@click.option("--preset", type=click.Choice(["paper", "classical"]), default=None,
              help="Guide settings and the SAE token preprocessing they go with (default: classical for the "
                   "filter bank, paper for ViTs).")
@click.option("--preprocess", default=None, callback=_steps,
              help="Override the preset's SAE token preprocessing (see `spg train-sae --help`; 'none' for raw).")
@click.option("-C", "--latents", "C", type=int, default=1024, show_default=True, help="SAE dictionary size.")
@click.option("-k", "--k", "k", type=int, default=16, show_default=True, help="SAE active latents per token.")
@click.option("--epochs", type=float, default=5.0, show_default=True, help="SAE training epochs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic datasets and training.")
@click.option("--detectors", default="all", show_default=True,
              help="Detectors to compare, comma-separated registry names (`spg detectors`), or all.")
@click.option("--shots", type=int, default=4, show_default=True, help="Normal images per category for few-shot ones.")
@click.option("--overlays", type=int, default=4, show_default=True,
              help="Anomalous target images per direction drawn with every method's map side by side "
                   "(<out>/reports/overlays/); 0: none.")
@_apply_run_options
def demo_cmd(store, out, backbone, weights, preset, preprocess, C, k, epochs, seed, detectors, shots, overlays,
             address, num_cpus, quiet, verbose) -> None:
    """The pipeline end to end on data it makes itself: synthesise an MVTec-layout and a VisA-layout dataset with
    disjoint categories, extract both, and in both directions train an SAE and guides on one and evaluate zero-shot
    on the other, next to every other detector on the same stored tokens; prints one table of every method (the
    same on every run with the same --seed) and one of their wall times. A re-run reuses the store."""
    from spg_dist.stages.demo import run_demo

    run_demo(out=out, store=store, backbone=backbone, weights=weights, C=C, k=k, epochs=epochs, seed=seed,
             preset=preset, preprocess=preprocess, detectors=detectors, shots=shots, overlays=overlays,
             address=address, num_cpus=num_cpus, quiet=quiet, verbose=verbose, echo=click.echo)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
