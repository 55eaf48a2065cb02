"""Stage 1 commands: ``spg train-sae``, ``spg encode``, ``spg saes``, ``spg atoms``."""

from __future__ import annotations


import click

from spg_dist.cli.base import DEFAULT_STORE, _apply, _int_list, _steps, _str_list, main


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
                     help="Dataset name(s) to train on: the auxiliary data (required when the store holds this "
                          "backbone's tokens of several datasets, so evaluation can check zero-shot)."),
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
    from spg_dist.ray.train_sae import train_saes

    result = train_saes(auxk=not no_auxk, split=None if split == "all" else split, dataset=dataset, **kwargs)
    if result.reused:
        click.echo(f"run {result.run} had finished before: nothing trained")
    for r in result.models:
        click.echo(f"registered {r['sae_id']}: nmse {r['nmse']:.4f} EV {r['explained_variance']:.3f} "
                   f"L0 {r['l0']:.1f} dead {100 * r['dead_fraction']:.1f}% ({r['steps']} steps)")


@main.command("encode")
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URI.")
@click.option("--sae", "sae_id", required=True, help="sae_id from sae_models (see `spg saes`).")
@click.option("--dataset", multiple=True, callback=_str_list, help="Only these dataset names (default: all).")
@click.option("--category", "categories", multiple=True, callback=_str_list, help="Only these categories.")
@click.option("--top-n", type=int, default=64, show_default=True,
              help="Activations kept per atom in atom_top, over all categories and within each category.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Images per SAE call.")
@click.option("--actors", "num_actors", type=int, default=1, show_default=True, help="SAE actors in the pool.")
@click.option("--rebuild-atoms", is_flag=True,
              help="Rebuild atom_images and atom_top from sae_codes even when they are current.")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray).")
@click.option("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def encode_cmd(store, sae_id, dataset, categories, top_n, batch_size, num_actors, rebuild_atoms, address, num_cpus,
               quiet) -> None:
    """Encode stored tokens with a trained SAE into sae_codes, then build atom_images (per atom, the images it
    fires in) and atom_top (per atom its top-N patches overall and per category) from all of the SAE's codes.
    Re-running encodes only what is missing and rebuilds the atom tables only when sae_codes changed (also after
    an interrupted or concurrent encode)."""
    from spg_dist.ray.encode import encode

    res = encode(store, sae_id, dataset=dataset, categories=categories, top_n=top_n, batch_size=batch_size,
                 num_actors=num_actors, rebuild_atoms=rebuild_atoms, address=address, num_cpus=num_cpus,
                 progress=not quiet)
    click.echo(res.summary())


@main.command("saes")
@click.option("--store", default=DEFAULT_STORE, show_default=True, help="Store URI.")
def saes_cmd(store) -> None:
    """List the SAEs registered in sae_models."""
    from spg_dist.store import Store, sae_models

    for r in sae_models.list_rows(Store(store)):
        click.echo(f"{r['sae_id']}  nmse {r['nmse']:.4f}  L0 {r['l0']:.1f}  dead {100 * r['dead_fraction']:.1f}%  "
                   f"{r['steps']} steps")


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
