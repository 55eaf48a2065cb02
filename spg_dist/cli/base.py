"""The ``spg`` group and what every subcommand shares: option parsers and one-line errors.

Subcommands import their stage lazily so ``spg --help`` is instant, and every expected failure (bad path,
unknown backbone, mismatched weights) is one line on stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations


import click

DEFAULT_STORE = "./store"


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
    """Expected failures (:class:`spg_dist.errors.SpgError`, the one base class) become one ``Error: ...`` line and
    exit 1, never a traceback; anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context):
        from spg_dist.errors import SpgError

        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except SpgError as e:
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
