"""``spg datasets``, ``spg extract``, ``spg backbones``, ``spg store``: getting images in and seeing what is there."""

from __future__ import annotations


import click

from spg_dist.cli.base import (DEFAULT_STORE, _apply, _int_list, _str_list, alias, dataset_spec, main, on_cluster,
                               package_version,
                               run_options, start_ray, store_path, weights_path)


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


@datasets.command("list")
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URI.")
def datasets_list_cmd(store) -> None:
    """List the datasets the store holds: the NAMEs --aux and --target take, with images and categories."""
    from spg_dist.store import Store, images

    uri = store_path(store, cluster=False)
    tbl = images.rows(Store(uri), columns=("dataset", "category", "split", "label")).to_pandas()
    if tbl.empty:
        click.echo(f"no datasets in {uri} (add one with `spg extract --dataset LAYOUT:PATH`)")
        return
    for name in images.datasets(Store(uri)):
        rows = tbl[tbl["dataset"] == name]
        cats = sorted(rows["category"].unique())
        click.echo(f"{name:24s} {len(rows):>7d} images ({int((rows['label'] == 1).sum())} defective) "
                   f"{len(cats)} categories: {', '.join(cats)}")


def extract_options(f):
    """Options of ``spg extract``, shared with ``jobs/extract.py`` (one definition, one --help)."""
    opts = [
        click.option("--dataset", required=True,
                     help="The dataset on disk: LAYOUT:PATH[@NAME] with LAYOUT mvtec, visa or folder, e.g. "
                          "mvtec:/data/mvtec_ad. NAME (default: the folder's name) prefixes every image_id and is how "
                          "later commands choose it (--aux NAME, --target NAME)."),
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
        click.option("--token", type=click.Choice(["block", "norm"]), default="block", show_default=True,
                     help="Which output of those blocks: 'block' (the block's output) or 'norm' (after the model's "
                          "final norm, as last_hidden_state / open_clip's ln_post: what DINOv3 and CLIP users take); "
                          "'norm' rows are stored under the backbone id <name>+norm."),
        click.option("--image-size", type=int, default=None,
                     help="Resize images to this square side. Default: the backbone's (448 DINOv3, 518 OpenCLIP L)."),
        click.option("--category", "categories", multiple=True, callback=_str_list,
                     help="Only these categories (repeat or comma-separate)."),
        click.option("--backbone-id", default=None,
                     help="Id the rows are keyed by. Default: the backbone name, plus @<weights folder> with --weights."),
        click.option("--batch-size", type=int, default=16, show_default=True, help="Images per backbone call."),
        click.option("--workers", "num_actors", type=int, default=1, show_default=True,
                     help="Backbone actors in the pool (one model copy each)."),
        click.option("--cpus-per-worker", "cpus_per_actor", type=float, default=1.0, show_default=True,
                     help="CPUs (and torch threads) per CPU backbone actor."),
        click.option("--gpus-per-worker", "gpus_per_actor", type=float, default=None,
                     help="GPUs per backbone actor (0: CPU actors). Default: 1 when the cluster has GPUs, else 0."),
        alias("--actors", "--workers", "num_actors", type=int),
        alias("--cpus-per-actor", "--cpus-per-worker", "cpus_per_actor", type=float),
        alias("--gpus-per-actor", "--gpus-per-worker", "gpus_per_actor", type=float),
        click.option("--commit-every", "commit_every_s", type=float, default=30.0, show_default=True,
                     help="Seconds between commits of written fragments (what a crash can lose)."),
        click.option("--max-pixels", type=click.IntRange(min=1), default=None,
                     help="Images whose header claims more pixels are an errors row, never decoded (default: "
                          "$SPG_MAX_IMAGE_PIXELS, else 64,000,000: MVTec AD and VisA images are at most ~1.5 M)."),
        click.option("--corruptions", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Also store the tokens of N CutPaste-corrupted copies of every normal train image, paired "
                          "with the clean ones (what FoundAD trains on); a re-run adds nothing."),
        *run_options(),
    ]
    return _apply(opts, f)


@main.command("extract")
@extract_options
def extract_cmd(quiet: bool, verbose: bool, **kwargs) -> None:
    """Extract patch tokens of a dataset into the store with a Ray Data pipeline (decode on CPU tasks, a pool of
    backbone actors, parallel Lance fragment writers). Re-running writes only what is missing."""
    cluster = on_cluster(kwargs.get("address"))
    kwargs["dataset"] = dataset_spec(kwargs["dataset"], cluster)
    kwargs["weights"] = weights_path(kwargs.get("weights"), cluster)
    kwargs["store"] = store_path(kwargs["store"], cluster, must_exist=False)
    start_ray(kwargs.get("address"), kwargs.get("num_cpus"), verbose)
    run_extract(quiet=quiet, **kwargs)


def run_extract(quiet: bool = False, **kwargs) -> None:
    from spg_dist.backbones import get_config
    from spg_dist.ray.extract import extract

    get_config(kwargs["backbone"])  # an unknown name: one line with the closest names, before Ray starts

    result = extract(progress=not quiet, **kwargs)
    for e in result.errors:
        click.echo(f"warning: {e['stage']} {e['image_id']}: {e['reason']}", err=True)
    click.echo(result.summary())


@main.command("backbones")
def backbones_cmd() -> None:
    """List the backbone registry (the names --backbone takes)."""
    from spg_dist.backbones import get_config, list_backbones

    for name in list_backbones():
        c = get_config(name)
        h, w = c.grid
        click.echo(f"{name:22s} {c.family:17s} {c.image_size:4d}px grid {h}x{w} d={c.dim:<5d} {c.num_layers:2d} layers "
                   f"{'(untrained, for tests)' if c.untrained else c.source}")


@main.group("store", invoke_without_command=True)
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URI.")
@click.pass_context
def store_group(ctx: click.Context, store: str) -> None:
    """Show the store's tables: rows, the schema version stored against the one schemas/<table>.json declares, and
    each table's Lance version (how many commits it has had). `spg store check` looks deeper."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = store
        return
    from spg_dist.store.check import describe_tables

    uri = store_path(store, cluster=False)
    click.echo(f"store {uri} (lancedb {package_version('lancedb', '?')}, lance {package_version('pylance', '?')})")
    for t in describe_tables(uri):
        if t["rows"] is None:
            click.echo(f"{t['table']:22s} {'-':>10s}")
            continue
        stored = "-" if t["schema_version"] is None else t["schema_version"]
        declared = "" if t["code_version"] is None else (
            f" (declared v{t['code_version']})" if t["code_version"] == t["schema_version"] else
            f" (MISMATCH: schemas/{t['table']}.json declares v{t['code_version']})")
        click.echo(f"{t['table']:22s} {t['rows']:>10d} rows  schema v{stored}{declared}  lance v{t['lance_version']}")


@store_group.command("check")
@click.option("--store", "store_opt", default=None, help="Store URI (default: the group's --store).")
@click.option("--repair", is_flag=True,
              help="Fix what is safe to fix: remove duplicate rows, orphan files past the grace period, compact and "
                   "clean old versions; say what cannot be fixed and which command can.")
@click.option("--drop-damaged", is_flag=True,
              help="With --repair: drop fragments whose data files are missing, truncated or unreadable (their rows "
                   "are lost until the stage that wrote them runs again).")
@click.option("--grace-seconds", type=float, default=3600.0, show_default=True,
              help="Unreferenced files younger than this may belong to a running writer and are left alone.")
@click.pass_context
def store_check_cmd(ctx: click.Context, store_opt, repair, drop_damaged, grace_seconds) -> None:
    """Per table: schema version, rows, unique keys against rows, orphan files, damaged data files (naming table and
    file); across tables: tokens without images rows, codes without tokens, atom_top without codes. Exit 1 when
    something is wrong (after --repair: when something could not be fixed)."""
    from spg_dist.store.check import check

    report = check(store_path(store_opt or ctx.obj or DEFAULT_STORE, cluster=False), repair=repair, drop_damaged=drop_damaged,
                   grace_seconds=grace_seconds)
    for line in report.lines():
        click.echo(line)
    if (report.not_repaired if repair else not report.ok):
        raise SystemExit(1)
