"""The ``spg`` command: one subcommand per stage (DESIGN.md's CLI contract).

Subcommands import their stage lazily so ``spg --help`` is instant, and every expected failure (bad path,
unknown backbone, mismatched weights) is one line on stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

DEFAULT_STORE = "./store"


def _user_errors() -> tuple[type[BaseException], ...]:
    from spg_dist.backbones.base import UnknownBackboneError, WeightsMismatchError
    from spg_dist.data.records import DatasetError
    from spg_dist.distributed.sae_data import NoTokensError
    from spg_dist.sae import NonFiniteLossError, SAEConfigError
    from spg_dist.store import SchemaError, StoreError
    from spg_dist.distributed.stage2 import CategoryOverlapError, NoAuxiliaryDataError, NoTargetDataError, \
        UnknownGuidesError
    from spg_dist.guides import GuideConfigError
    from spg_dist.store.sae_models import UnknownSAEError

    return (DatasetError, UnknownBackboneError, WeightsMismatchError, StoreError, SchemaError, FileNotFoundError,
            NoTokensError, SAEConfigError, NonFiniteLossError, UnknownSAEError, CategoryOverlapError,
            NoAuxiliaryDataError, NoTargetDataError, UnknownGuidesError, GuideConfigError)


def _int_list(_ctx, _param, value: str | None) -> list[int] | None:
    if value is None or value == "":
        return None
    try:
        return [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def _apply(options, f):
    """Apply a list of click options in the order they are listed (shared by a command and its jobs/ twin)."""
    for opt in reversed(options):
        f = opt(f)
    return f


def _str_list(_ctx, _param, value: tuple[str, ...] | str | None) -> list[str] | None:
    if not value:
        return None
    items = value if isinstance(value, (tuple, list)) else (value,)
    return [v.strip() for item in items for v in item.split(",") if v.strip()] or None


def _steps(_ctx, _param, value: str | None) -> str | None:
    """Validate --preprocess at parse time (one line naming the bad step) and normalise its order."""
    if value is None:
        return None
    from spg_dist.sae.preprocess import parse_steps

    try:
        return ",".join(parse_steps(value)) or "none"
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


class _FriendlyErrors:
    """Expected failures become one ``Error: ...`` line and exit 1, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except _user_errors() as e:
            text = str(e).strip()
            raise click.ClickException(text.splitlines()[0] if text else repr(e)) from None


class _Command(_FriendlyErrors, click.Command):
    pass


class _Group(_FriendlyErrors, click.Group):
    command_class = _Command
    group_class = type  # subgroups are _Group too


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """spg_dist: distributed SAE-based zero-shot anomaly detection (Sparse-Projected Guides) on Ray + LanceDB."""


@main.group()
def datasets() -> None:
    """Create and inspect datasets."""


@datasets.command("synth")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write the dataset into.")
@click.option("--layout", type=click.Choice(["mvtec", "visa"]), default="mvtec", show_default=True,
              help="Directory layout to write (categories are disjoint between the two layouts).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed: same seed, same bytes.")
@click.option("--image-size", type=int, default=224, show_default=True, help="Side of the square images.")
@click.option("--n-train", type=int, default=None, help="Normal training images per category (default: generator's).")
@click.option("--n-test-good", type=int, default=None, help="Normal test images per category.")
@click.option("--n-test-bad", type=int, default=None, help="Defective test images per category.")
@click.option("--category", "categories", multiple=True, callback=_str_list,
              help="Only these categories (repeat or comma-separate).")
def synth_cmd(out, layout, seed, image_size, n_train, n_test_good, n_test_bad, categories) -> None:
    """Write a synthetic anomaly-detection dataset from images that ship with scikit-image/scikit-learn/matplotlib,
    with scratches, cracks, holes, stains, cut-paste and colour defects and exact pixel masks."""
    from spg_dist.data.synth import synthesize

    kwargs = {k: v for k, v in dict(n_train=n_train, n_test_good=n_test_good, n_test_bad=n_test_bad,
                                    categories=categories).items() if v is not None}
    path = synthesize(out, layout=layout, seed=seed, image_size=image_size, **kwargs)
    from spg_dist.data.spec import list_records

    recs = list_records(f"{layout}:{path}")
    cats = sorted({r.category for r in recs})
    click.echo(f"wrote {len(recs)} images ({sum(r.label == 1 for r in recs)} defective) in {len(cats)} categories "
               f"({', '.join(cats)}) to {path}; use it as --dataset {layout}:{path}")


def extract_options(f):
    """Options of ``spg extract``, shared with ``jobs/extract.py`` (one definition, one --help)."""
    opts = [
        click.option("--dataset", required=True,
                     help="LAYOUT:PATH[@NAME] with LAYOUT mvtec, visa or folder, e.g. mvtec:/data/mvtec_ad. NAME "
                          "(default: the folder's name) prefixes every image_id."),
        click.option("--backbone", default="tiny-dinov3", show_default=True,
                     help="Registry name (see `spg backbones`), e.g. dinov3-vitl16, dinov2-vitl14, siglip-l16-384, "
                          "openclip-vitl14-336; tiny-* are untrained test models; NAME@random is the real "
                          "architecture with random weights (for speed tests)."),
        click.option("--weights", default=None,
                     help="Hub id or local path of the weights (HF: a save_pretrained folder; OpenCLIP: a checkpoint "
                          "file or pretrained tag; 'random': seeded random init). Default: the registry's hub id "
                          "(offline that needs a local Hugging Face cache)."),
        click.option("--store", default=DEFAULT_STORE, show_default=True,
                     help="Store URI: a local folder or s3://… / gs://…"),
        click.option("--layers", default=None, callback=_int_list,
                     help="Comma-separated transformer blocks to store (1-based; -1 = last). Default: last."),
        click.option("--image-size", type=int, default=None,
                     help="Resize images to this square side. Default: the backbone's (448 DINOv3, 518 OpenCLIP L)."),
        click.option("--category", "categories", multiple=True, callback=_str_list,
                     help="Only these categories (repeat or comma-separate)."),
        click.option("--backbone-id", default=None,
                     help="Id the rows are keyed by. Default: the backbone name, plus @<weights folder> with --weights."),
        click.option("--batch-size", type=int, default=16, show_default=True, help="Images per backbone call."),
        click.option("--actors", "num_actors", type=int, default=1, show_default=True,
                     help="Backbone actors in the pool (one model copy each)."),
        click.option("--gpus-per-actor", type=float, default=None,
                     help="GPUs per actor. Default: 1 when the cluster has GPUs, else CPU actors."),
        click.option("--cpus-per-actor", type=float, default=1.0, show_default=True,
                     help="CPUs (and torch threads) per CPU actor."),
        click.option("--commit-every", "commit_every_s", type=float, default=30.0, show_default=True,
                     help="Seconds between commits of written fragments (what a crash can lose)."),
        click.option("--address", default=None,
                     help="Ray cluster address (default: RAY_ADDRESS, as set by `ray job submit`, else a local Ray)."),
        click.option("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    return _apply(opts, f)


@main.command("extract")
@extract_options
def extract_cmd(quiet: bool, **kwargs) -> None:
    """Extract patch tokens of a dataset into the store with a Ray Data pipeline (decode on CPU tasks, a pool of
    backbone actors, parallel Lance fragment writers). Re-running writes only what is missing."""
    run_extract(quiet=quiet, **kwargs)


def run_extract(quiet: bool = False, **kwargs) -> None:
    from spg_dist.distributed.extract import extract

    result = extract(progress=not quiet, **kwargs)
    for e in result.errors:
        click.echo(f"warning: {e['stage']} {e['image_id']}: {e['reason']}", err=True)
    click.echo(result.summary())


def train_sae_options(f):
    """Options of ``spg train-sae``, shared with ``jobs/train_sae.py``."""
    opts = [
        click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URI holding patch_tokens."),
        click.option("--backbone", required=True, help="Backbone id whose stored tokens to train on."),
        click.option("--layer", type=int, default=-1, show_default=True,
                     help="Stored layer to train on (-1: the deepest stored layer of the backbone)."),
        click.option("-C", "--latents", "Cs", default="4096", show_default=True, callback=_int_list,
                     help="Dictionary size(s) C, comma-separated: every (C, k) pair is trained in the same pass."),
        click.option("-k", "--k", "ks", default="32", show_default=True, callback=_int_list,
                     help="Active latents per token, comma-separated."),
        click.option("--sparsifier", "sparsifiers", default="topk", show_default=True, callback=_str_list,
                     help="topk and/or batchtopk (comma-separated: both are trained side by side)."),
        click.option("--dataset", "dataset", multiple=True, callback=_str_list,
                     help="Only tokens of these dataset names (default: all stored for the backbone)."),
        click.option("--category", "categories", multiple=True, callback=_str_list, help="Only these categories."),
        click.option("--split", default="train", show_default=True,
                     help="Only this split ('all' for every split)."),
        click.option("--epochs", type=float, default=1.0, show_default=True, help="Passes over the tokens."),
        click.option("--token-budget", type=int, default=None, help="Train on this many tokens instead of --epochs."),
        click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate."),
        click.option("--batch-tokens", type=int, default=4096, show_default=True,
                     help="Tokens per optimizer step, over all workers."),
        click.option("--workers", type=int, default=1, show_default=True, help="Ray Train workers (DDP)."),
        click.option("--gpu/--no-gpu", "use_gpu", default=False, show_default=True,
                     help="One GPU per worker, bf16 autocast, NCCL."),
        click.option("--cpus-per-worker", type=float, default=1.0, show_default=True, help="CPUs per CPU worker."),
        click.option("--data-mode", type=click.Choice(["auto", "memory", "stream"]), default="auto",
                     show_default=True, help="memory: each worker holds its shard (on its device); stream: Ray "
                                             "Data with a shuffle buffer; auto: memory when the shard fits."),
        click.option("--no-auxk", "no_auxk", is_flag=True, help="Switch off AuxK dead-latent revival."),
        click.option("--k-aux", type=int, default=None, help="Dead latents used by AuxK (default d/2)."),
        click.option("--dead-tokens", type=int, default=None,
                     help="A latent is dead after this many tokens without firing (default 10 M, scaled down to a "
                          "tenth of the training tokens on small data)."),
        click.option("--input-scaling", type=click.Choice(["none", "unit_mean_sq_norm"]), default="none",
                     show_default=True, help="Scale tokens before the SAE (recorded with the model); same as "
                                             "adding 'scale' to --preprocess."),
        click.option("--preprocess", default="none", show_default=True, callback=_steps,
                     help="Token preprocessing steps, comma-separated, fitted on the training tokens and recorded "
                          "with the SAE (guides and evaluation inherit them): center (subtract each image's median "
                          "token), standardize (per-dimension mean/std), scale (unit mean square per dimension), "
                          "constant (append the median token norm as one extra component: lets SPG's cosine see "
                          "magnitude). The classical encoder's demo uses standardize,constant."),
        click.option("--checkpoint-every", type=int, default=200, show_default=True, help="Steps between checkpoints."),
        click.option("--log-every", type=int, default=50, show_default=True, help="Steps between metric logs."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of init and shuffling."),
        click.option("--run-name", default=None,
                     help="Run name (default: a hash of the settings, so the same command resumes its run)."),
        click.option("--storage-path", default=None, help="Where checkpoints go (default: <store>/_runs)."),
        click.option("--max-failures", type=int, default=0, show_default=True,
                     help="Worker failures Ray Train recovers from (restarting at the latest checkpoint)."),
        click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)."),
        click.option("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)."),
    ]
    return _apply(opts, f)


@main.command("train-sae")
@train_sae_options
def train_sae_cmd(no_auxk: bool, split: str, dataset, **kwargs) -> None:
    """Train TopK SAEs on stored patch tokens with Ray Train; a (C, k) grid costs one pass over the data.
    Checkpoints every --checkpoint-every steps; re-running the same command resumes; finished SAEs are
    registered in sae_models."""
    from spg_dist.distributed.train_sae import train_saes

    rows = train_saes(auxk=not no_auxk, split=None if split == "all" else split, dataset=dataset, **kwargs)
    for r in rows:
        click.echo(f"registered {r['sae_id']}: nmse {r['nmse']:.4f} EV {r['explained_variance']:.3f} "
                   f"L0 {r['l0']:.1f} dead {100 * r['dead_fraction']:.1f}% ({r['steps']} steps)")


@main.command("encode")
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URI.")
@click.option("--sae", "sae_id", required=True, help="sae_id from sae_models (see `spg saes`).")
@click.option("--dataset", multiple=True, callback=_str_list, help="Only these dataset names (default: all).")
@click.option("--category", "categories", multiple=True, callback=_str_list, help="Only these categories.")
@click.option("--top-n", type=int, default=64, show_default=True, help="Activations kept per atom in atom_top.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Images per SAE call.")
@click.option("--actors", "num_actors", type=int, default=1, show_default=True, help="SAE actors in the pool.")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray).")
@click.option("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def encode_cmd(store, sae_id, dataset, categories, top_n, batch_size, num_actors, address, num_cpus, quiet) -> None:
    """Encode stored tokens with a trained SAE into sae_codes, atom_index (BTree-indexed on atom) and atom_top.
    Re-running encodes only what is missing."""
    from spg_dist.distributed.encode import encode

    res = encode(sae_id, store, dataset=dataset, categories=categories, top_n=top_n, batch_size=batch_size,
                 num_actors=num_actors, address=address, num_cpus=num_cpus, progress=not quiet)
    click.echo(res.summary())


@main.command("saes")
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URI.")
def saes_cmd(store) -> None:
    """List the SAEs registered in sae_models."""
    from spg_dist.store import Store
    from spg_dist.store.sae_models import list_saes

    for r in list_saes(Store(store)):
        click.echo(f"{r['sae_id']}  nmse {r['nmse']:.4f}  L0 {r['l0']:.1f}  dead {100 * r['dead_fraction']:.1f}%  "
                   f"{r['steps']} steps")


@main.group()
def atoms() -> None:
    """Query SAE atoms in the store: which patches fire an atom most, and how atoms spread over categories."""


@atoms.command("top")
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URI.")
@click.option("--sae", "sae_id", required=True, help="sae_id (see `spg saes`).")
@click.option("--atom", type=int, required=True, help="Atom (latent) index.")
@click.option("-n", "n", type=int, default=8, show_default=True, help="How many patches.")
@click.option("--category", default=None, help="Only patches of this category (an indexed atom_index query).")
@click.option("--gallery", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG: each patch crop and the atom's activation map over the whole image.")
@click.option("--verify", is_flag=True, help="Also compute the top-n by brute force from sae_codes and compare.")
def atoms_top_cmd(store, sae_id, atom, n, category, gallery, verify) -> None:
    """Top patches of an atom: image, row, col, value, category (one indexed lookup in atom_top)."""
    import time

    from spg_dist.store import Store
    from spg_dist.store.atoms import brute_force_top, top_patches

    s = Store(store)
    t0 = time.perf_counter()
    rows = top_patches(s, sae_id, atom, n, category)
    ms = 1e3 * (time.perf_counter() - t0)
    click.echo(f"{'rank':>4}  {'image_id':48s} {'row':>4} {'col':>4} {'value':>9}  category")
    for r in rows.to_pylist():
        click.echo(f"{r['rank']:>4}  {r['image_id']:48s} {r['row']:>4} {r['col']:>4} {r['value']:>9.4f}  {r['category']}")
    click.echo(f"({rows.num_rows} rows in {ms:.1f} ms)")
    if verify:
        ref = brute_force_top(s, sae_id, atom, n, category)
        same = ref.select(["image_id", "patch", "value"]).equals(rows.select(["image_id", "patch", "value"]))
        click.echo("verify: equal to the brute-force top-n over sae_codes" if same else
                   "verify: MISMATCH with the brute-force top-n over sae_codes")
        if not same:
            raise SystemExit(1)
    if gallery:
        from spg_dist.viz import atom_gallery_png

        click.echo(f"gallery: {atom_gallery_png(s, sae_id, atom, rows, gallery)}")


@atoms.command("stats")
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URI.")
@click.option("--sae", "sae_id", required=True, help="sae_id (see `spg saes`).")
@click.option("--png", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG: firing frequency against category entropy.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None, help="Write the full table as CSV.")
@click.option("--show", type=int, default=20, show_default=True, help="Rows to print (most frequent atoms).")
def atoms_stats_cmd(store, sae_id, png, csv_path, show) -> None:
    """Per-atom firing frequency and the entropy of its activation mass across categories (0: one category,
    1: spread evenly): category-general vs category-specific atoms."""
    from spg_dist.store import Store
    from spg_dist.store.atoms import atom_stats

    stats = atom_stats(Store(store), sae_id)
    cols = ["atom", "count", "frequency", "mean_activation", "n_categories", "category_entropy", "top_category"]
    click.echo(stats.sort_values("count", ascending=False)[cols].head(show).to_string(index=False))
    fired = stats["count"] > 0
    click.echo(f"{int(fired.sum())} of {len(stats)} atoms fire; median entropy of firing atoms "
               f"{stats.loc[fired, 'category_entropy'].median():.3f}")
    if csv_path:
        stats.to_csv(csv_path, index=False)
        click.echo(f"csv: {csv_path}")
    if png:
        from spg_dist.viz import atom_stats_png

        click.echo(f"png: {atom_stats_png(stats, png)}")


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


@main.command("backbones")
def backbones_cmd() -> None:
    """List the backbone registry."""
    from spg_dist.backbones import get_config, list_backbones

    for name in list_backbones():
        c = get_config(name)
        h, w = c.grid
        click.echo(f"{name:22s} {c.family:17s} {c.image_size:4d}px grid {h}x{w} d={c.dim:<5d} {c.num_layers:2d} layers "
                   f"{'(untrained, for tests)' if c.untrained else c.source}")


@main.command("store")
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URI.")
def store_cmd(store: str) -> None:
    """Show the store's tables, row counts and schema versions."""
    from spg_dist.store import Store, known_tables

    s = Store(store)
    for name in known_tables():
        click.echo(f"{name:14s} {s.count(name):>10d} rows" if s.has_table(name) else f"{name:14s}          -")


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
@click.option("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all).")
def demo_cmd(store, out, backbone, weights, preset, preprocess, C, k, epochs, seed, num_cpus) -> None:
    """The pipeline end to end on data it makes itself: synthesise an MVTec-layout and a VisA-layout dataset with
    disjoint categories, extract both, and in both directions train an SAE and guides on one and evaluate zero-shot
    on the other, next to training-free baselines; prints a Table-1-style summary. A re-run reuses the store."""
    from spg_dist.distributed.demo import run_demo

    run_demo(out=out, store=store, backbone=backbone, weights=weights, C=C, k=k, epochs=epochs, seed=seed,
             preset=preset, preprocess=preprocess, num_cpus=num_cpus, echo=click.echo)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
