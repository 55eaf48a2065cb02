"""`spg demo` end to end on a smaller synthetic pair: both directions, SPG next to both baselines, the reports,
the preset's token preprocessing recorded with the SAEs, and a re-run that reuses the store."""

from __future__ import annotations

import json

import numpy as np

import pytest

from spg_dist.distributed.demo import run_demo
from spg_dist.store import Store

pytestmark = pytest.mark.timeout(300)  # the shared fixture below is one whole small demo (~55-100 s here)

SMALL = dict(n_train=4, n_test_good=2, n_test_bad=3, categories=None)


@pytest.fixture(scope="module")
def demo_run(ray_cluster, tmp_path_factory):
    """One small demo (~55 s here, almost all of it Ray start-up per stage: 2 extractions, 2 Ray Train runs, 2
    encodes); the tests below read what it returned and wrote."""
    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    summary = run_demo(out=out, C=128, k=8, epochs=2, synth=SMALL, echo=lines.append)
    return out, summary, lines


def test_demo_prints_both_directions_with_baselines_and_writes_reports(demo_run):
    tmp_path, summary, lines = demo_run
    directions = summary.index.get_level_values("direction").unique().tolist()
    assert directions == ["synth_visa -> synth_mvtec", "synth_mvtec -> synth_visa"]
    assert summary.shape == (6, 4)
    assert set(summary.index.get_level_values("method")) == {"SPG (ours)", "kNN 4-shot", "MuSc-style (label-free)"}
    values = summary.to_numpy()
    assert np.isfinite(values).all() and ((values >= 0) & (values <= 1)).all()
    text = "\n".join(lines)
    assert "Zero-shot cross-dataset summary" in text and "[demo] done" in text

    reports = tmp_path / "reports"
    assert (reports / "table1.csv").exists() and (reports / "table1.md").exists()
    assert len(list(reports.glob("anomaly_atom_*.png"))) == 4  # two strongest anomaly atoms per direction
    store = Store(tmp_path / "store")
    saes = store.read("sae_models", columns=["sae_id", "d", "config"]).to_pylist()
    assert len(saes) == 2
    for row in saes:  # the classical preset: standardize + appended constant, recorded with the model
        pre = json.loads(row["config"])["preprocessing"]
        assert pre["constant"] > 0 and len(pre["mean"]) == row["d"] - 1 and not pre["center"]


def test_demo_rerun_reuses_the_store(demo_run):
    tmp_path, summary, _ = demo_run
    store = Store(tmp_path / "store")
    counts = {t: store.count(t) for t in ("patch_tokens", "sae_models", "guides", "eval_results", "sae_codes")}
    again = run_demo(out=tmp_path, C=128, k=8, epochs=2, synth=SMALL, echo=lambda _: None)
    assert {t: store.count(t) for t in counts} == counts  # nothing duplicated, nothing retrained
    assert np.allclose(again.to_numpy(), summary.to_numpy())
