"""The LanceDB feature store: schemas, the connection, and one module per table family.

Each table module owns its table's name, key, filters, reads and writes and returns Arrow tables, rows or bytes,
never models (the store knows no method):

* :mod:`.images` — ``images`` and ``errors``
* :mod:`.tokens` — ``patch_tokens`` (:class:`~.tokens.TokenSelection`, streaming readers, fragment commits)
* :mod:`.sae_models` — ``sae_models``
* :mod:`.codes` / :mod:`.atoms` — ``sae_codes``, ``atom_index``, ``atom_top`` (writes / queries)
* :mod:`.guides` — ``guides``
* :mod:`.eval_results` — ``eval_results``

Filters from user values are built by :mod:`.filters` (LanceDB typed expressions), never by string formatting.
"""

from spg_dist.store import codes, detector_models, eval_results, guides, images, sae_models, sweeps, tokens
from spg_dist.store.connection import Store, StoreError, dedupe_keys, write_fragment
from spg_dist.store.filters import match, where
from spg_dist.store.schemas import SchemaError, TableSchema, known_tables, load_schema
from spg_dist.store.tokens import (TokenSelection, iter_tokens, load_tokens, tokens_from_arrow, tokens_to_arrow)
from spg_dist.store.torch_reader import TokenDataset

__all__ = ["SchemaError", "Store", "StoreError", "TableSchema", "TokenDataset", "TokenSelection", "codes",
           "dedupe_keys", "detector_models", "eval_results", "guides", "images", "iter_tokens", "known_tables", "load_schema",
           "load_tokens", "match", "sae_models", "sweeps", "tokens", "tokens_from_arrow", "tokens_to_arrow", "where",
           "write_fragment"]
