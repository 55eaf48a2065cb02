"""The errors a user can cause and fix, under one base class.

Every expected failure (a bad path, an unknown name, data the store does not hold, a setting that cannot work)
is a :class:`SpgError` whose message is one line saying what is wrong and what to run instead. The CLI catches
this one class and prints that line (exit 1); anything else is a bug and keeps its traceback.

Errors that belong to one module (``SAEConfigError`` in ``spg_dist.sae``, ``SchemaError`` in ``spg_dist.store``)
live there and derive from :class:`SpgError`; the ones here are shared by several stages. Each also derives from
the builtin it refines (``LookupError``, ``ValueError``...) so ``except ValueError`` keeps working for callers
that predate this module. Pure Python: every layer may import it.
"""

from __future__ import annotations

from typing import Sequence


class SpgError(Exception):
    """Base of every user-facing error; ``str(e)`` is one line naming the input and what to do."""


class NoTokensError(SpgError, LookupError):
    """No stored tokens match the requested backbone/layer/filter; the message says what the store holds and
    which ``spg extract`` to run."""


class NoAuxiliaryDataError(SpgError, LookupError):
    """The auxiliary dataset has no tokens for the model's backbone/layer, or no anomalous image with a mask."""


class NoTargetDataError(SpgError, LookupError):
    """The target dataset has no test tokens for the backbone/layer a detector reads."""


class CategoryOverlapError(SpgError, ValueError):
    """A target category also occurs in data a model was trained on: not a zero-shot evaluation."""


class UnknownNameError(SpgError, LookupError):
    """A name (detector, dataset, table) that is not known; the message lists the known ones."""

    def __str__(self) -> str:  # LookupError/KeyError quote their message; keep it one readable line
        return str(self.args[0]) if self.args else ""


class MissingInputError(SpgError, ValueError):
    """A method asked for an input it needs (``--aux``, ``--shots``) without it; the message names the option."""


def did_you_mean(name: str, known: Sequence[str], n: int = 3) -> str:
    """``"did you mean 'a', 'b'? "`` for the closest of ``known`` to ``name`` (difflib), else ``""``."""
    import difflib

    close = difflib.get_close_matches(name, list(known), n=n, cutoff=0.5)
    return f"did you mean {', '.join(map(repr, close))}? " if close else ""


__all__ = ["did_you_mean", "CategoryOverlapError", "MissingInputError", "NoAuxiliaryDataError", "NoTargetDataError",
           "NoTokensError", "SpgError", "UnknownNameError"]
