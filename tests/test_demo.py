"""`spg demo` end to end on a smaller synthetic pair: both directions, every detector through the one evaluation
loop into one eval_results table, the reports, the preset's token preprocessing recorded with the SAEs, no
re-extraction by any detector but VisualAD (which runs its own ViT by design), and a re-run that reuses the store."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spg_dist.stages.demo import run_demo
from spg_dist.store import Store

pytestmark = pytest.mark.timeout(600)  # the shared fixture below is one whole small demo

SMALL = dict(n_train=4, n_test_good=2, n_test_bad=3, categories=None)
FAST = {"foundad": {"steps": 40, "width": 32, "heads": 4, "depth": 2}, "visualad": {"epochs": 1, "image_size": 64}}
METHODS = {"SPG (ours, zero-shot)", "kNN 4-shot", "MuSc (label-free)", "LAKE 4-shot", "FoundAD 4-shot",
           "VisualAD (zero-shot)"}


@pytest.fixture(scope="module")
def demo_run(ray_cluster, tmp_path_factory):
    """One small demo; counts how often a backbone is built in this process while it runs (extraction builds
    them inside Ray actors, so only a detector that runs its own backbone shows up here)."""
    import spg_dist.backbones.registry as registry

    out = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    built: list[str] = []
    original = registry._builder  # what every create_backbone call goes through, whoever imported it

    def counting(family):
        build = original(family)

        def record(config, *a, **k):
            built.append(config.name)
            return build(config, *a, **k)
        return record

    registry._builder = counting
    try:
        summary = run_demo(out=out, C=128, k=8, epochs=2, synth=SMALL, params=FAST, echo=lines.append)
    finally:
        registry._builder = original
    return out, summary, lines, built


def test_demo_prints_every_method_in_both_directions_and_writes_reports(demo_run):
    tmp_path, summary, lines, _ = demo_run
    directions = summary.index.get_level_values("direction").unique().tolist()
    assert directions == ["synth_visa -> synth_mvtec", "synth_mvtec -> synth_visa"]
    assert set(summary.index.get_level_values("method")) == METHODS
    assert summary.shape == (12, 5) and list(summary.columns)[-1] == "seconds"
    values = summary.drop(columns="seconds").to_numpy()
    assert np.isfinite(values).all() and ((values >= 0) & (values <= 1)).all()
    assert (summary["seconds"] > 0).all()
    text = "\n".join(lines)
    assert "Zero-shot cross-dataset summary" in text and "[demo] done" in text
    assert "visualad runs its own ViT" in text

    reports = tmp_path / "reports"
    assert (reports / "table1.csv").exists() and (reports / "table1.md").exists()
    assert len(list(reports.glob("anomaly_atom_*.png"))) == 4  # two strongest anomaly atoms per direction
    store = Store(tmp_path / "store")
    saes = store.read("sae_models", columns=["sae_id", "d", "config"]).to_pylist()
    assert len(saes) == 2
    for row in saes:  # the classical preset: standardize + appended constant, recorded with the model
        pre = json.loads(row["config"])["preprocessing"]
        assert pre["constant"] > 0 and len(pre["mean"]) == row["d"] - 1 and not pre["center"]
    # one eval_results table holds every detector, all scored at the same resolution
    res = store.read("eval_results", columns=["detector", "resolution", "category"]).to_pandas()
    assert set(res.detector) == {"spg", "knn", "musc", "lake", "foundad", "visualad"}
    assert res.resolution.nunique() == 1


def test_only_visualad_runs_a_backbone(demo_run):
    """Every detector reads the stored tokens; VisualAD is the declared exception (a ViT in its loop)."""
    _, _, _, built = demo_run
    assert built and set(built) == {"tiny-openclip"}


def test_demo_rerun_reuses_the_store(demo_run):
    tmp_path, summary, _, _ = demo_run
    store = Store(tmp_path / "store")
    tables = ("patch_tokens", "sae_models", "guides", "eval_results", "sae_codes", "detector_models", "corruptions")
    counts = {t: store.count(t) for t in tables}
    assert counts["detector_models"] == 4  # foundad and visualad, both directions
    lines: list[str] = []
    again = run_demo(out=tmp_path, C=128, k=8, epochs=2, synth=SMALL, params=FAST, echo=lines.append)
    assert {t: store.count(t) for t in tables} == counts  # nothing duplicated, nothing retrained
    assert sum("reused fitted weights" in line for line in lines) == 4
    np.testing.assert_allclose(again.drop(columns="seconds").to_numpy(), summary.drop(columns="seconds").to_numpy())
