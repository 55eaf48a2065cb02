"""The LanceDB feature store: schemas, the connection, idempotent writers and streaming readers."""

from spg_dist.store.connection import Store, StoreError, dedupe_keys, write_fragment
from spg_dist.store.schemas import SchemaError, TableSchema, known_tables, load_schema
from spg_dist.store.torch_reader import TokenDataset
from spg_dist.store.tokens import (iter_tokens, load_tokens, tokens_from_arrow,
                                   tokens_to_arrow, where_clause)

__all__ = ["Store", "StoreError", "SchemaError", "TableSchema", "known_tables", "load_schema", "dedupe_keys",
           "write_fragment", "tokens_to_arrow", "tokens_from_arrow", "iter_tokens", "load_tokens",
           "TokenDataset", "where_clause"]
