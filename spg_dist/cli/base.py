"""The ``spg`` group and what every subcommand shares: option parsers, one-line errors, the one vocabulary.

Subcommands import their stage lazily so ``spg --help`` is instant, and every expected failure (bad path,
unknown backbone, mismatched weights) is one line on stderr with a non-zero exit, never a traceback.

The vocabulary every command speaks:

* ``--dataset LAYOUT:PATH`` is a dataset on disk (only ``spg extract`` reads images); a stored dataset chosen by
  name is ``--aux NAME`` where a command learns from it and ``--target NAME`` where it is evaluated or encoded.
* ``--workers N``, ``--cpus-per-worker F``, ``--gpus-per-worker F``: the parallelism of a stage.
* ``--address``, ``--num-cpus``, ``-q/--quiet``, ``-v/--verbose`` on every command that runs stage work.

Old spellings stay as hidden aliases that still work and print one ``note:`` line on stderr.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Sequence

import click
from click.core import ParameterSource

DEFAULT_STORE = "./store"

INTERRUPTED = "interrupted; what was committed stays in the store (re-run the same command to go on)"

# `spg --help` lists the stages in the order they run, then the commands that look into the store
COMMAND_ORDER = ("datasets", "extract", "train-sae", "encode", "train-guides", "evaluate", "detect", "sweep",
                 "reproduce", "demo", "store", "saes", "atoms", "backbones", "detectors")

RELATIVE_ON_CLUSTER = ("is relative; a submitted job runs in a temporary copy of the working directory on each node, "
                       "where relative paths point elsewhere (git-ignored data is absent, a relative store is thrown "
                       "away). Pass an absolute path every node can read, or s3://…")


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


def _split(value: Iterable[str] | str | None) -> list[str] | None:
    if not value:
        return None
    items = value if isinstance(value, (tuple, list)) else (value,)
    return [v.strip() for item in items for v in item.split(",") if v.strip()] or None


def _str_list(_ctx, _param, value: tuple[str, ...] | str | None) -> list[str] | None:
    return _split(value)


def _steps(_ctx, _param, value: str | None) -> str | None:
    """Validate --preprocess at parse time (one line naming the bad step) and normalise its order."""
    if value is None:
        return None
    from spg_dist.sae.preprocess import parse_steps

    try:
        return ",".join(parse_steps(value)) or "none"
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


# ---- hidden aliases of old option names -----------------------------------------------------------------------

_ALIASES = "spg.aliases"


def alias(old: str, new: str, dest: str, *, what: str = "", to: Callable[[Any, dict], Any] | None = None,
          merge: bool = False, **option_kwargs):
    """A hidden option ``old`` that still works: its value lands in parameter ``dest`` (unless ``new`` is given too,
    or always with ``merge``; ``to(value, params)`` converts it) and it prints ``note: OLD is now NEW<what>; the
    old name will go``."""
    name = "_alias_" + old.split("/")[0].lstrip("-").replace("-", "_")

    def callback(ctx: click.Context, param: click.Parameter, value):
        if ctx.get_parameter_source(param.name) in (None, ParameterSource.DEFAULT) or value in (None, ()):
            return
        click.echo(f"note: {old.split('/')[0]} is now {new}{what}; the old name will go", err=True)

        def apply(c: click.Context) -> None:
            if merge or c.get_parameter_source(dest) in (None, ParameterSource.DEFAULT):
                c.params[dest] = to(value, c.params) if to else value

        ctx.meta.setdefault(_ALIASES, []).append(apply)

    option_kwargs.setdefault("default", None)
    return click.option(old, name, hidden=True, expose_value=False, callback=callback, **option_kwargs)


# ---- run options: one spelling on every command that runs stage work ------------------------------------------

def run_options(in_process: bool = False) -> list:
    """``--address``, ``--num-cpus``, ``-q/--quiet``, ``-v/--verbose``; ``in_process``: a stage with no Ray path
    (they are accepted for one vocabulary)."""
    here = " Accepted for one vocabulary: this stage runs in this process." if in_process else ""
    return [
        click.option("--address", default=None,
                     help="Ray cluster address (default: RAY_ADDRESS, as `ray job submit` sets it, else a local Ray). "
                          "On a cluster, dataset, weights and store paths must be absolute or s3://…" + here),
        click.option("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)." + here),
        click.option("-q", "--quiet", is_flag=True, help="No progress output."),
        click.option("-v", "--verbose", is_flag=True, help="Show Ray's own INFO/WARNING logs."),
    ]


def on_cluster(address: str | None) -> bool:
    """Whether the work is submitted to a Ray cluster (``--address`` or RAY_ADDRESS, as `ray job submit` sets)."""
    addr = address or os.environ.get("RAY_ADDRESS")
    return bool(addr) and addr != "local"


def local_path(value: str, option: str, cluster: bool) -> str:
    """A URI as given; a local path made absolute, or refused when relative on a cluster."""
    if "://" in value:
        return value
    path = os.path.expanduser(value)
    if os.path.isabs(path):
        return path
    if cluster:
        raise click.ClickException(f"{option} {value!r} {RELATIVE_ON_CLUSTER}")
    return os.path.abspath(path)


def dataset_spec(spec: str, cluster: bool, option: str = "--dataset") -> str:
    """``LAYOUT:PATH[@NAME]`` with PATH made absolute (refused when relative on a cluster)."""
    layout, sep, rest = spec.partition(":")
    if not sep or not rest.strip() or "://" in rest:
        return spec  # the parser says what is wrong
    path, at = rest, ""
    if "@" in rest:
        head, _, tail = rest.rpartition("@")
        if tail and "/" not in tail and os.sep not in tail:
            path, at = head, "@" + tail
    if not at and os.path.basename(path.rstrip("/" + os.sep)) in ("", ".", ".."):
        # the default NAME is the folder's name: keep the one the user sees
        at = "@" + os.path.basename(os.path.abspath(os.path.expanduser(path)))
    return f"{layout}:{local_path(path, option, cluster)}{at}"


def weights_path(value: str | None, cluster: bool, option: str = "--weights") -> str | None:
    """A weights path made absolute (refused when relative on a cluster); a hub id, tag or 'random' as given."""
    if value is None or value == "random" or "://" in value:
        return value
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded) or value.startswith(".") or os.path.exists(value) or value.count("/") > 1:
        return local_path(value, option, cluster)
    return value


def store_path(value: str, cluster: bool, must_exist: bool = True, option: str = "--store") -> str:
    """The store URI to pass on: absolute, refused when relative on a cluster, and (``must_exist``) refused when
    no store is there."""
    uri = local_path(value, option, cluster)
    if must_exist:
        from spg_dist.store.connection import Store

        Store.open_existing(uri)
    return uri


def start_ray(address: str | None, num_cpus: int | None, verbose: bool) -> None:
    """Record ``-v`` for the Ray runtime of this command (started by the first stage that has Ray work, with Ray's
    own INFO/WARNING logs shown when verbose); nothing starts here."""
    from spg_dist.ray import runtime

    if hasattr(runtime, "configure_ray"):
        runtime.configure_ray(verbose=verbose)
    elif verbose:  # an older runtime without configure_ray: start Ray now, logs on; the stage reuses it
        import inspect

        params = inspect.signature(runtime.ensure_ray).parameters
        runtime.ensure_ray(address, num_cpus, **({"verbose": True} if "verbose" in params else {"quiet": False}))


def check_name(name: str, known: Sequence[str], what: str, see: str, where: str = "") -> None:
    """Refuse a ``name`` not in ``known`` with one line: the closest matches and where to see them all (``see``:
    a command, or any text in parentheses)."""
    if name in known:
        return
    from spg_dist.errors import UnknownNameError, did_you_mean

    see = see[1:-1] if see.startswith("(") else f"all: `{see}`"
    raise UnknownNameError(f"unknown {what} {name!r}{where}; {did_you_mean(name, known)}({see})")


def check_datasets(store: str, names: Sequence[str] | None, option: str) -> None:
    if not names:
        return
    from spg_dist.store import Store, images

    known = images.datasets(Store(store))
    for name in names:
        check_name(name, known, f"dataset ({option})", f"spg datasets list --store {store}", f" in {store}")


def check_sae(store: str, sae_id: str) -> None:
    from spg_dist.store import Store, sae_models

    known = [r["sae_id"] for r in sae_models.list_rows(Store(store), columns=("sae_id",))]
    check_name(sae_id, known, "SAE", f"spg saes --store {store}", f" in {store}")


def check_guides(store: str, guide_id: str) -> None:
    from spg_dist.store import Store, guides

    known = guides.ids(Store(store))
    listed = ", ".join(known[:8]) + (" …" if len(known) > 8 else "")
    check_name(guide_id, known, "guide set", f"(known: {listed or 'none; `spg train-guides` makes them'})", f" in {store}")


def check_detector(method: str) -> None:
    from spg_dist.detectors import get_detector_class, list_detectors
    from spg_dist.errors import UnknownNameError

    try:
        get_detector_class(method)
    except UnknownNameError:
        check_name(method, list_detectors(), "detector", "spg detectors")


# ---- the command classes ----------------------------------------------------------------------------------------

class _FriendlyErrors:
    """Expected failures (:class:`spg_dist.errors.SpgError`, the one base class) become one ``Error: ...`` line and
    exit 1, never a traceback; Ctrl-C is one line and exit 130; anything else is a bug and keeps its traceback."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rest = super().parse_args(ctx, args)  # type: ignore[misc]
        for apply in ctx.meta.pop(_ALIASES, []):
            apply(ctx)
        return rest

    def invoke(self, ctx: click.Context):
        from spg_dist.errors import SpgError

        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except SpgError as e:
            text = str(e).strip()
            raise click.ClickException(text.splitlines()[0] if text else repr(e)) from None
        except KeyboardInterrupt:
            click.echo(INTERRUPTED, err=True)
            raise click.exceptions.Exit(130) from None


class _Command(_FriendlyErrors, click.Command):
    pass


class _Group(_FriendlyErrors, click.Group):
    command_class = _Command
    group_class = type  # subgroups are _Group too

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = list(self.commands)
        rank = {n: i for i, n in enumerate(COMMAND_ORDER)}
        return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def package_version(dist: str, missing: str = "not installed") -> str:
    """The installed version of distribution ``dist`` (``missing`` when it is not installed)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return missing


def _version(ctx: click.Context, _param, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    ver = package_version
    click.echo(f"spg_dist {ver('spg_dist')}")
    for dist in ("torch", "ray", "lancedb", "pylance"):
        click.echo(f"{'lance' if dist == 'pylance' else dist} {ver(dist)}")
    ctx.exit(0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_version,
              help="Show the version of spg_dist (and of torch, ray, lancedb, lance) and exit.")
def main() -> None:
    """spg_dist: distributed SAE-based zero-shot anomaly detection (Sparse-Projected Guides) on Ray + LanceDB.

    The stages in the order they run: extract -> train-sae -> encode -> train-guides -> evaluate/detect; sweep and
    reproduce run many of them; demo runs everything on data it makes itself."""
