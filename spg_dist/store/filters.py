"""The one way a filter is built from user values: LanceDB's typed expressions (``lancedb.expr``).

``match(dataset="O'Brien", atom=[1, 2])`` is an :class:`~lancedb.expr.Expr` (``col == lit`` / ``isin``) that
LanceDB queries take as they are; :func:`where` renders the same expression as SQL for the APIs that only take a
string (Lance scanners, ``count_rows``, ``delete``). Either way a value is a literal, quoted by LanceDB itself,
so ``x' OR 1=1 --`` matches only the row whose value is exactly that. Column names come from our code, never
from users, and are checked to be plain identifiers. No table module writes SQL by hand.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Any, Iterable

import numpy as np
from lancedb.expr import Expr, col, lit

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SCALARS = (str, bool, int, float, _dt.datetime, _dt.date)


def _literal(value: Any) -> Any:
    """A Python scalar LanceDB can quote; NumPy scalars are unwrapped, anything else is refused."""
    if isinstance(value, np.generic):
        value = value.item()
    if not isinstance(value, _SCALARS):
        raise TypeError(f"filter value {value!r} of type {type(value).__name__} is not a plain scalar")
    return value


def match(**filters: Any) -> Expr | None:
    """``col = value`` for scalars, ``col IN (...)`` for lists/sets/tuples, all ANDed; ``None`` values are skipped.

    An empty list matches nothing. Returns None when no filter is left (read everything).
    """
    expr: Expr | None = None
    for name, value in filters.items():
        if value is None:
            continue
        if not _IDENT.fullmatch(name):
            raise ValueError(f"not a column name: {name!r}")
        if isinstance(value, (list, tuple, set, frozenset, np.ndarray)):
            values = sorted({_literal(v) for v in value}, key=lambda v: (str(type(v)), v))
            term = col(name).isin([lit(v) for v in values]) if values else lit(False)
        else:
            term = col(name) == lit(_literal(value))
        expr = term if expr is None else expr & term
    return expr


def where(*extra: str | Expr | None, **filters: Any) -> str | None:
    """The SQL text of :func:`match` (ANDed with already-built ``extra`` expressions), or None for no filter."""
    parts = [e.to_sql() if isinstance(e, Expr) else e for e in extra if e is not None]
    m = match(**filters)
    if m is not None:
        parts.append(m.to_sql())
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else " AND ".join(f"({p})" for p in parts)


def chunks(values: Iterable[Any], size: int = 2000) -> Iterable[list[Any]]:
    """Split long key lists so one ``IN (...)`` never grows without bound."""
    batch: list[Any] = []
    for v in values:
        batch.append(v)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


__all__ = ["chunks", "match", "where"]
