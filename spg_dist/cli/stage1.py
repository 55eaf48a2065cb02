"""Stage 1 commands: ``spg train-sae``, ``spg encode``, ``spg saes``, ``spg atoms``."""

from __future__ import annotations


import click

from spg_dist.cli.base import (DEFAULT_STORE, _apply, _int_list, _split, _steps, _str_list, alias, check_datasets,
                               check_sae, main, on_cluster, run_options, start_ray, store_path)


def _with_scale(value: str, params: dict) -> str:
    """The old --input-scaling unit_mean_sq_norm is the 'scale' step of --preprocess."""
    if value == "none":
        return params.get("preprocess") or "none"
    return _steps(None, None, ",".join(s for s in (params.get("preprocess") or "none", "scale") if s != "none"))


def _gpus(value: float | None, option: str = "--gpus-per-worker") -> bool | None:
    """A stage that places one GPU per worker (or none): F must be 0 or 1."""
    if value is None:
        return None
    if value not in (0, 1):
        raise click.BadParameter(f"{value:g}: this stage uses one whole GPU per worker or none; pass 1 or 0",
                                 param_hint=option)
    return bool(value)


def _apply_run_options(f):
    return _apply(run_options(), f)


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
        click.option("--aux", "dataset", multiple=True, callback=_str_list,
                     help="Stored dataset name(s) to train on, the auxiliary data (repeat or comma-separate; required "
                          "when the store holds this backbone's tokens of several datasets, so evaluation can check "
                          "zero-shot). `spg datasets list` shows the names."),
        alias("--dataset", "--aux", "dataset", what=" (a stored dataset name)", multiple=True,
              to=lambda v, _p: _split(v)),
        click.option("--all-datasets", is_flag=True,
                     help="Train on every dataset stored for the backbone (evaluating on any of them is then "
                          "refused as not zero-shot)."),
        click.option("--category", "categories", multiple=True, callback=_str_list, help="Only these categories."),
        click.option("--split", default="train", show_default=True,
                     help="Only this split ('all' for every split)."),
        click.option("--epochs", type=float, default=1.0, show_default=True, help="Passes over the tokens."),
        click.option("--token-budget", type=int, default=None, help="Train on this many tokens instead of --epochs."),
        click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate."),
        click.option("--batch-tokens", type=int, default=4096, show_default=True,
                     help="Tokens per optimizer step, over all workers."),
        click.option("--batch-images", type=int, default=None,
                     help="Images per optimizer step (the paper: 16); overrides --batch-tokens."),
        click.option("--engine", type=click.Choice(["ray-train", "local"]), default="ray-train", show_default=True,
                     help="ray-train: a Ray Train TorchTrainer (DDP over --workers); local: one process, no Ray."),
        click.option("--workers", type=int, default=1, show_default=True, help="Ray Train workers (DDP)."),
        click.option("--cpus-per-worker", type=float, default=1.0, show_default=True, help="CPUs per CPU worker."),
        click.option("--gpus-per-worker", type=float, default=0.0, show_default=True,
                     help="1: one GPU per worker, bf16 autocast, NCCL; 0: CPU workers."),
        alias("--gpu/--no-gpu", "--gpus-per-worker 1 (or 0)", "gpus_per_worker", to=lambda v, _p: 1.0 if v else 0.0),
        click.option("--data-mode", type=click.Choice(["auto", "memory", "stream"]), default="auto",
                     show_default=True, help="memory: each worker holds its shard (on its device); stream: Ray "
                                             "Data with a shuffle buffer; auto: memory when the shard fits."),
        click.option("--no-auxk", "no_auxk", is_flag=True, help="Switch off AuxK dead-latent revival."),
        click.option("--k-aux", type=int, default=None, help="Dead latents used by AuxK (default d/2)."),
        click.option("--dead-tokens", type=int, default=None,
                     help="A latent is dead after this many tokens without firing (default 10 M, scaled down to a "
                          "tenth of the training tokens on small data)."),
        click.option("--preprocess", default="none", show_default=True, callback=_steps,
                     help="Token preprocessing steps, comma-separated, fitted on the training tokens and recorded "
                          "with the SAE (guides and evaluation inherit them): center (subtract each image's median "
                          "token), standardize (per-dimension mean/std), scale (unit mean square per dimension), "
                          "constant (append the median token norm as one extra component: lets SPG's cosine see "
                          "magnitude). The classical encoder's demo uses standardize,constant."),
        alias("--input-scaling", "--preprocess scale", "preprocess", type=click.Choice(["none", "unit_mean_sq_norm"]),
              to=_with_scale, merge=True),
        click.option("--checkpoint-every", type=int, default=200, show_default=True, help="Steps between checkpoints."),
        click.option("--log-every", type=int, default=50, show_default=True, help="Steps between metric logs."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of init and shuffling."),
        click.option("--run-name", default=None,
                     help="Run name (default: a hash of the settings, so the same command resumes its run)."),
        click.option("--storage-path", default=None, help="Where checkpoints go (default: <store>/_runs)."),
        click.option("--max-failures", type=int, default=0, show_default=True,
                     help="Worker failures Ray Train recovers from (restarting at the latest checkpoint)."),
        *run_options(),
    ]
    return _apply(opts, f)


@main.command("train-sae")
@train_sae_options
def train_sae_cmd(no_auxk: bool, split: str, dataset, gpus_per_worker, quiet, verbose, **kwargs) -> None:
    """Train TopK SAEs on stored patch tokens with Ray Train; a (C, k) grid costs one pass over the data.
    Checkpoints every --checkpoint-every steps; re-running the same command resumes; finished SAEs are
    registered in sae_models."""
    from spg_dist.ray.train_sae import train_saes

    cluster = on_cluster(kwargs.get("address"))
    kwargs["store"] = store_path(kwargs["store"], cluster)
    if kwargs.get("storage_path"):
        kwargs["storage_path"] = store_path(kwargs["storage_path"], cluster, must_exist=False,
                                            option="--storage-path")
    check_datasets(kwargs["store"], dataset, "--aux")
    use_gpu = bool(_gpus(gpus_per_worker))
    start_ray(kwargs.get("address"), kwargs.get("num_cpus"), verbose)
    result = train_saes(auxk=not no_auxk, split=None if split == "all" else split, dataset=dataset, use_gpu=use_gpu,
                        progress=not quiet, echo=lambda m: click.echo(m, err=True), **kwargs)
    if result.reused:
        click.echo(f"run {result.run} had finished before: nothing trained")
    for r in result.models:
        click.echo(f"registered {r['sae_id']}: nmse {r['nmse']:.4f} EV {r['explained_variance']:.3f} "
                   f"L0 {r['l0']:.1f} dead {100 * r['dead_fraction']:.1f}% ({r['steps']} steps)")


@main.command("encode")
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URI.")
@click.option("--sae", "sae_id", required=True, help="sae_id from sae_models (see `spg saes`).")
@click.option("--target", "dataset", multiple=True, callback=_str_list,
              help="Only these stored dataset names (repeat or comma-separate; default: all). `spg datasets list` "
                   "shows the names.")
@alias("--dataset", "--target", "dataset", what=" (a stored dataset name)", multiple=True, to=lambda v, _p: _split(v))
@click.option("--category", "categories", multiple=True, callback=_str_list, help="Only these categories.")
@click.option("--top-n", type=int, default=64, show_default=True,
              help="Activations kept per atom in atom_top, over all categories and within each category.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Images per SAE call.")
@click.option("--workers", "num_actors", type=int, default=1, show_default=True, help="SAE actors in the pool.")
@click.option("--gpus-per-worker", type=float, default=None,
              help="1: one GPU per SAE actor; 0: CPU actors. Default: 1 when the cluster has GPUs, else 0.")
@alias("--actors", "--workers", "num_actors", type=int)
@click.option("--rebuild-atoms", is_flag=True,
              help="Rebuild atom_images and atom_top from sae_codes even when they are current.")
@_apply_run_options
def encode_cmd(store, sae_id, dataset, categories, top_n, batch_size, num_actors, gpus_per_worker, rebuild_atoms,
               address, num_cpus, quiet, verbose) -> None:
    """Encode stored tokens with a trained SAE into sae_codes, then build atom_images (per atom, the images it
    fires in) and atom_top (per atom its top-N patches overall and per category) from all of the SAE's codes.
    Re-running encodes only what is missing and rebuilds the atom tables only when sae_codes changed (also after
    an interrupted or concurrent encode)."""
    from spg_dist.ray.encode import encode

    store = store_path(store, on_cluster(address))
    check_sae(store, sae_id)
    check_datasets(store, dataset, "--target")
    use_gpu = _gpus(gpus_per_worker)
    start_ray(address, num_cpus, verbose)
    res = encode(store, sae_id, dataset=dataset, categories=categories, top_n=top_n, batch_size=batch_size,
                 num_actors=num_actors, use_gpu=use_gpu, rebuild_atoms=rebuild_atoms, address=address,
                 num_cpus=num_cpus, progress=not quiet)
    click.echo(res.summary())


@main.group("saes", invoke_without_command=True)
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URI.")
@click.pass_context
def saes_cmd(ctx: click.Context, store) -> None:
    """List the SAEs registered in sae_models; `spg saes show SAE_ID` shows one (and writes its figures)."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = store
        return
    from spg_dist.store import Store, sae_models

    rows = sae_models.list_rows(Store(store_path(store, cluster=False)))
    if not rows:
        click.echo(f"no SAEs in {store} (train one with `spg train-sae`)")
    for r in rows:
        click.echo(f"{r['sae_id']}  nmse {r['nmse']:.4f}  L0 {r['l0']:.1f}  dead {100 * r['dead_fraction']:.1f}%  "
                   f"{r['steps']} steps")


@saes_cmd.command("show")
@click.argument("sae_id")
@click.option("--store", "store_opt", default=None, help="Store URI (default: the group's --store).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Also write the SAE's figures (firing histogram, training curves, …) into this folder.")
@click.pass_context
def saes_show_cmd(ctx: click.Context, sae_id, store_opt, out) -> None:
    """One SAE's record: dictionary size C, k, backbone, layer, steps, NMSE, L0, dead fraction, what it was
    trained on; with --out its figures."""
    import json

    from spg_dist.store import Store, sae_models

    store = store_path(store_opt or ctx.obj or DEFAULT_STORE, cluster=False)
    check_sae(store, sae_id)
    r = sae_models.get(Store(store), sae_id, with_weights=False)
    try:
        cfg = json.loads(r.get("config") or "{}")
    except ValueError:
        cfg = {}
    pre = cfg.get("preprocessing") or {}
    prep = [n for n, on in (("center", pre.get("center")), ("standardize", pre.get("mean") is not None),
                            ("scale", pre.get("scale") not in (None, 1, 1.0, False)), ("constant", pre.get("constant")))
            if on]
    data = cfg.get("filter")
    fields = [("sae_id", r["sae_id"]), ("backbone", r["backbone"]), ("layer", r["layer"]), ("d", r["d"]),
              ("C", r["C"]), ("k", r["k"]), ("sparsifier", r["sparsifier"]), ("steps", r["steps"]),
              ("tokens seen", r["tokens_seen"]), ("nmse", f"{r['nmse']:.4f}"),
              ("explained variance", f"{r['explained_variance']:.3f}"), ("L0", f"{r['l0']:.1f}"),
              ("dead fraction", f"{100 * r['dead_fraction']:.1f}%"), ("run", r["run"]), ("run dir", r["run_dir"]),
              ("created", r["created_at"])]
    if prep:
        fields.append(("preprocess", ",".join(map(str, prep))))
    if data:
        fields.append(("trained on", json.dumps(data, default=str)))
    for key, value in fields:
        click.echo(f"{key:19s} {value}")
    if out:
        from pathlib import Path

        from spg_dist.viz.sae_figures import write_sae_figures

        paths = write_sae_figures(Store(store), sae_id, Path(out))
        for path in paths:
            click.echo(f"wrote {path}")
        if not paths:
            click.echo("no figures: this SAE's row holds no firing record and no training curve")


@main.group()
def atoms() -> None:
    """Query SAE atoms in the store: which patches fire an atom most (top), which images it fires in (firing), and
    how atoms spread over categories (stats)."""


@atoms.command("top")
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URI.")
@click.option("--sae", "sae_id", required=True, help="sae_id (see `spg saes`).")
@click.option("--atom", type=int, required=True, help="Atom (latent) index.")
@click.option("-n", "n", type=int, default=8, show_default=True, help="How many patches.")
@click.option("--category", default=None, help="Only patches of this category (also one indexed atom_top lookup).")
@click.option("--gallery", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG: each patch crop and the atom's activation map over the whole image.")
@click.option("--verify", is_flag=True, help="Also compute the top-n by brute force from sae_codes and compare.")
def atoms_top_cmd(store, sae_id, atom, n, category, gallery, verify) -> None:
    """Top patches of an atom, over all categories or within one: image, row, col, value, category (one indexed
    lookup in atom_top; n beyond atom_top's N reads atom_images and the few images that can hold the answer)."""
    import time

    from spg_dist.store import Store
    from spg_dist.store.atoms import brute_force_top, top_patches

    store = store_path(store, cluster=False)
    check_sae(store, sae_id)
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


@atoms.command("firing")
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URI.")
@click.option("--sae", "sae_id", required=True, help="sae_id (see `spg saes`).")
@click.option("--atom", type=int, required=True, help="Atom (latent) index.")
@click.option("--category", default=None, help="Only images of this category.")
@click.option("--show", type=int, default=20, show_default=True, help="Rows to print (strongest maximum first).")
def atoms_images_cmd(store, sae_id, atom, category, show) -> None:
    """Which images an atom fires in: per image the patches it fires on, their sum, the maximum and where
    (one indexed lookup in atom_images)."""
    import time

    from spg_dist.store import Store
    from spg_dist.store.atoms import images_firing

    store = store_path(store, cluster=False)
    check_sae(store, sae_id)
    t0 = time.perf_counter()
    rows = images_firing(Store(store), sae_id, atom, category)
    ms = 1e3 * (time.perf_counter() - t0)
    click.echo(f"{'image_id':48s} {'count':>6} {'sum':>9} {'max':>9} {'row':>4} {'col':>4}  label  category")
    for r in rows.slice(0, show).to_pylist():
        click.echo(f"{r['image_id']:48s} {r['count']:>6} {r['sum_value']:>9.4f} {r['max_value']:>9.4f} "
                   f"{r['row']:>4} {r['col']:>4}  {r['label']:>5}  {r['category']}")
    click.echo(f"({rows.num_rows} images, {sum(rows.column('count').to_pylist())} firings, in {ms:.1f} ms)")


@atoms.command("stats")
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URI.")
@click.option("--sae", "sae_id", required=True, help="sae_id (see `spg saes`).")
@click.option("--png", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG: firing frequency against category entropy.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None, help="Write the full table as CSV.")
@click.option("--show", type=int, default=20, show_default=True, help="Rows to print (most frequent atoms).")
def atoms_stats_cmd(store, sae_id, png, csv_path, show) -> None:
    """Per-atom firing frequency and the entropy of its activation mass across categories (0: one category,
    1: spread evenly): category-general vs category-specific atoms (sums over atom_images rows)."""
    from spg_dist.store import Store
    from spg_dist.store.atoms import atom_stats

    store = store_path(store, cluster=False)
    check_sae(store, sae_id)
    stats = atom_stats(Store(store), sae_id)
    cols = ["atom", "count", "frequency", "mean_activation", "n_categories", "category_entropy", "top_category"]
    click.echo(stats.sort_values("count", ascending=False)[cols].head(show).to_string(index=False))
    fired = stats["count"] > 0
    click.echo(f"{int(fired.sum())} of {len(stats)} atoms fire on the encoded images "
               f"({int((~fired).sum())} never fired on them); median entropy of firing atoms "
               f"{stats.loc[fired, 'category_entropy'].median():.3f}")
    dead = stats.attrs.get("training_dead")
    click.echo(f"dead (not fired in the last {dead['dead_tokens']:,} training tokens): {dead['n_dead']} of "
               f"{len(stats)} ({100 * dead['dead_fraction']:.1f}%), as stored with the SAE" if dead else
               "dead: not recorded for this SAE (registered before the record was stored)")
    if csv_path:
        stats.to_csv(csv_path, index=False)
        click.echo(f"csv: {csv_path}")
    if png:
        from spg_dist.viz import atom_stats_png

        click.echo(f"png: {atom_stats_png(stats, png)}")
