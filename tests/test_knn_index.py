"""kNN at scale: an approximate LanceDB vector index on a bank table agrees with exact search (recall@1 >= 0.95 on
a planted bank), is built once and reused, is chosen automatically above a bank size, and runs through
`spg detect`."""

from __future__ import annotations

import numpy as np
import pytest

from spg_dist.detectors import FitData, KNNDetector, TokenSet
from spg_dist.detectors.knn import ExactIndex
from spg_dist.store import Store, banks


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def planted_bank(n=20_000, d=32, n_queries=2000, seed=0):
    """Clustered bank vectors (as patch tokens are) and queries that are noisy copies of bank vectors, so every
    query has a true nearest neighbour it was planted next to."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, d))
    bank = _unit(centres[rng.integers(0, 64, n)] + 0.6 * rng.normal(size=(n, d))).astype(np.float32)
    src = rng.integers(0, n, n_queries)
    queries = _unit(bank[src] + 0.05 * rng.normal(size=(n_queries, d))).astype(np.float32)
    return bank, queries, src


def test_approximate_index_agrees_with_exact_search(tmp_path):
    store = Store(tmp_path / "s")
    bank, queries, src = planted_bank()
    exact = ExactIndex(bank).nearest(queries)
    index, built = banks.build(store, bank, nprobes=16)
    assert built
    approx = index.nearest(queries)
    recall = float(np.mean(np.isclose(approx, exact, atol=1e-5)))  # the same neighbour (IVF_FLAT distances are exact)
    assert recall >= 0.95, recall
    assert (approx >= exact - 1e-5).all()  # an approximate search can only miss the best, never beat it
    # a patch equal to a bank entry scores 0
    np.testing.assert_allclose(index.nearest(bank[:50]), 0.0, atol=1e-5)
    again, built_again = banks.build(store, bank)
    assert not built_again and banks.list_banks(store) == [banks.table_name(banks.bank_id_for(bank))]
    import lancedb
    tbl = lancedb.connect(store.uri).open_table(banks.list_banks(store)[0])  # plain lancedb reads the bank
    assert tbl.count_rows() == len(bank) and [i.index_type for i in tbl.list_indices()] == ["IvfFlat"]


def test_knn_detector_switches_to_the_index_above_its_threshold(tmp_path):
    store = Store(tmp_path / "s")
    rng = np.random.default_rng(1)
    normal = _unit(rng.normal(size=(4, 16, 16, 24))).astype(np.float32)
    test = _unit(rng.normal(size=(2, 16, 16, 24))).astype(np.float32)
    shots = TokenSet({1: normal}, [f"n{i}" for i in range(4)], ["c"] * 4, np.zeros(4, np.int8))
    factory = banks.index_factory(store, nprobes=64)
    small = KNNDetector(shots=4, approximate_above=10_000, index_factory=factory).fit(FitData(shots=shots))
    assert not small.approximate and not banks.list_banks(store)
    big = KNNDetector(shots=4, approximate_above=500, index_factory=factory).fit(FitData(shots=shots))
    assert big.approximate and len(banks.list_banks(store)) == 1
    np.testing.assert_allclose(big.score(test), small.score(test), atol=1e-5)  # 1024 vectors: nprobes covers all


def test_knn_approximate_through_spg_detect(tmp_path):
    from test_stage2 import make_stage2_store

    from spg_dist.stages.detect import detect

    store = make_stage2_store(tmp_path)
    exact = detect(store, "knn", "aux", backbone="bb", shots=2, params={"index": "exact"}, run="exact")
    approx = detect(store, "knn", "aux", backbone="bb", shots=2, params={"index": "approximate", "nprobes": 8},
                    run="approx")
    assert len(banks.list_banks(store)) == 2  # one bank per category
    np.testing.assert_allclose(approx.table.to_numpy(), exact.table.to_numpy(), atol=1e-6)


def test_knn_index_needs_a_factory():
    from spg_dist.detectors import DetectorConfigError

    shots = TokenSet({1: np.ones((1, 2, 2, 4), np.float32)}, ["a"], ["c"], np.zeros(1, np.int8))
    with pytest.raises(DetectorConfigError, match="index factory"):
        KNNDetector(shots=1, index="approximate").fit(FitData(shots=shots))
