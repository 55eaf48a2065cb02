"""Memory banks for approximate nearest-neighbour search: tables ``knn_bank_<bank_id>`` (schema family
``knn_bank``), each holding L2-normalised vectors with a LanceDB vector index (IVF_FLAT, cosine).

Why IVF_FLAT: it keeps the raw vectors, so the distance it returns for the neighbour it finds is exact (only the
choice of partitions to probe is approximate) and recall@1 is tuned by ``nprobes`` alone; with ~200 vectors per
partition a batch of queries runs as one Lance scan. A bank is keyed by a hash of its contents, built once, and
reused by every later run on the same shots. Vectors in, distances out: the store knows no detector.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from spg_dist.store.connection import Store
from spg_dist.store.schemas import load_schema

FAMILY = "knn_bank"
ROWS_PER_PARTITION = 200
DEFAULT_NPROBES = 32


def bank_id_for(vectors: np.ndarray) -> str:
    """A content hash: the same vectors (same shots, backbone, layer) always map to the same bank."""
    h = hashlib.blake2b(digest_size=12)
    h.update(np.asarray(vectors.shape, np.int64).tobytes())
    h.update(np.ascontiguousarray(vectors, np.float32).tobytes())
    return h.hexdigest()


def table_name(bank_id: str) -> str:
    return f"{FAMILY}_{bank_id}"


@dataclass
class LanceBank:
    """Nearest-neighbour queries against one indexed bank table (``spg_dist.detectors.knn.NeighbourIndex``)."""

    uri: str
    storage_options: dict[str, str] | None = None
    nprobes: int = DEFAULT_NPROBES
    chunk: int = 5000

    def nearest(self, queries: np.ndarray) -> np.ndarray:
        """Cosine distance (1 - cos) of each L2-normalised query to its nearest bank vector, ``[n]`` float32."""
        import lance

        ds = lance.dataset(self.uri, storage_options=self.storage_options)
        q = np.ascontiguousarray(queries, np.float32)
        out = np.full(len(q), np.nan, np.float32)
        for s in range(0, len(q), self.chunk):
            r = ds.to_table(columns=["row", "_distance"], nearest={"column": "vector", "q": q[s:s + self.chunk], "k": 1,
                                                      "nprobes": self.nprobes})
            out[r.column("query_index").to_numpy() + s] = r.column("_distance").to_numpy()
        # a zero query has no direction: Lance drops it from the result; its cosine distance to anything is 1
        out[np.isnan(out)] = 1.0
        return np.maximum(out, 0.0)  # the index may return -1e-7 for an exact match


def build(store: Store, vectors: np.ndarray, image_ids: list[str] | None = None, *,
          rows_per_partition: int = ROWS_PER_PARTITION, nprobes: int = DEFAULT_NPROBES
          ) -> tuple[LanceBank, bool]:
    """The indexed bank of ``vectors`` ``[n, d]`` (L2-normalised), built now or found in the store: (bank, built)."""
    from lancedb.index import IvfFlat

    vectors = np.ascontiguousarray(vectors, np.float32)
    n, d = vectors.shape
    bank_id = bank_id_for(vectors)
    name = table_name(bank_id)
    if name in store.db.list_tables().tables:
        tbl = store.db.open_table(name)
        if tbl.count_rows() == n and any(i.columns == ["vector"] for i in tbl.list_indices()):
            return LanceBank(tbl.to_lance().uri, store.storage_options, nprobes), False
        store.db.drop_table(name)  # a half-built bank of a crashed run
    per = max(1, n // max(1, len(image_ids or [1])))
    ids = [image_ids[i // per] for i in range(n)] if image_ids else [""] * n
    data = pa.table({"bank_id": [bank_id] * n, "row": pa.array(np.arange(n, dtype=np.int64)), "image_id": ids,
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), d)})
    data = load_schema(FAMILY, dim=d).validate(data)
    tbl = store.db.create_table(name, data, schema=load_schema(FAMILY, dim=d).arrow, mode="overwrite")
    tbl.create_index("vector", config=IvfFlat(distance_type="cosine",
                                              num_partitions=int(min(4096, max(1, n // rows_per_partition)))))
    return LanceBank(tbl.to_lance().uri, store.storage_options, nprobes), True


def index_factory(store: Store, nprobes: int = DEFAULT_NPROBES, echo: Callable[[str], None] = lambda _: None
                  ) -> Callable[[np.ndarray, dict[str, Any]], LanceBank]:
    """What ``KNNDetector(index_factory=...)`` calls with a bank to build (or reuse) its approximate index."""
    def make(bank: np.ndarray, context: dict[str, Any]) -> LanceBank:
        index, built = build(store, bank, context.get("image_ids"), nprobes=nprobes)
        echo(f"[knn] {'built' if built else 'reused'} an IVF_FLAT index on a bank of {len(bank)} patches"
             f"{' (' + str(context['category']) + ')' if context.get('category') else ''}")
        return index
    return make


def list_banks(store: Store) -> list[str]:
    return sorted(t for t in store.db.list_tables().tables if t.startswith(FAMILY + "_"))


__all__ = ["DEFAULT_NPROBES", "FAMILY", "LanceBank", "bank_id_for", "build", "index_factory", "list_banks",
           "table_name"]
