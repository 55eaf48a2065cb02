"""`spg demo` end to end on a smaller synthetic pair: both directions, every detector through the one evaluation
loop into one eval_results table, the reports, the preset's token preprocessing recorded with the SAEs, no
re-extraction by any detector but VisualAD (which runs its own ViT by design), a re-run that reuses the store, and a
second run from scratch with the same seed that prints the same table, digit for digit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spg_dist.stages.demo import TABLE_TITLE, TIMES_TITLE, format_seconds, format_summary, run_demo
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
    assert TABLE_TITLE in text and TIMES_TITLE in text and "[demo] done" in text
    assert "visualad runs its own ViT" in text
    table = format_summary(summary)
    assert table in text and "seconds" not in table  # the metrics table carries no wall time: it is reproducible
    assert format_seconds(summary) in text

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


def test_demo_overlays_one_column_per_method(demo_run):
    """Per direction one figure of anomalous target images, every method's map side by side (or, while the
    evaluation loop cannot hand maps back, one line saying why there is none)."""
    tmp_path, summary, lines, _ = demo_run
    overlay_lines = [ln for ln in lines if ln.startswith("[overlays]")]
    assert len(overlay_lines) == 2
    figures = sorted((tmp_path / "reports" / "overlays").glob("*.png"))
    if all("skipped" in ln for ln in overlay_lines):
        assert not figures
        pytest.skip(overlay_lines[0])
    assert [f.name for f in figures] == ["synth_mvtec_to_synth_visa.png", "synth_visa_to_synth_mvtec.png"]
    assert all("6 methods" in ln and str(tmp_path) in ln for ln in overlay_lines)


def test_demo_cli_speaks_the_common_vocabulary():
    from click.testing import CliRunner

    from spg_dist.cli import main

    out = CliRunner().invoke(main, ["demo", "--help"]).output
    for opt in ("--address", "--num-cpus", "-q, --quiet", "-v, --verbose", "--seed", "--overlays"):
        assert opt in out, opt


@pytest.mark.slow
@pytest.mark.soak  # every CI run checks the same through test_readme.py: a fresh demo prints README's table
def test_demo_is_deterministic_for_a_seed(demo_run, tmp_path):
    """A second run from scratch (new datasets, new store, new SAEs, new detectors) prints the same metrics table as
    the first, digit for digit: nothing depends on the order Ray writes rows in, and every draw is seeded."""
    _, summary, _, _ = demo_run
    lines: list[str] = []
    again = run_demo(out=tmp_path, C=128, k=8, epochs=2, synth=SMALL, params=FAST, overlays=0, echo=lines.append)
    assert format_summary(again) == format_summary(summary)
    np.testing.assert_array_equal(again.drop(columns="seconds").to_numpy(), summary.drop(columns="seconds").to_numpy())


def test_sae_does_not_depend_on_the_order_rows_were_written_in(demo_run, tmp_path):
    """The root cause the determinism test guards: Ray Data writes token rows in whatever order its writers finish
    (preserve_order is off), so two extractions store the same rows in different orders. The SAE trainer must give
    the same model either way (it reads its shard in image_id order)."""
    import shutil

    import lance
    import pyarrow as pa

    from spg_dist.ray.train_sae import train_saes

    out, _, _, _ = demo_run
    weights = []
    for name, reverse in (("as_written", False), ("reversed", True)):
        copy = tmp_path / name
        shutil.copytree(out / "store", copy)
        if reverse:
            uri = str(copy / "patch_tokens.lance")
            table = lance.dataset(uri).to_table()
            lance.write_dataset(table.take(pa.array(np.arange(table.num_rows)[::-1].copy())), uri, mode="overwrite")
        r = train_saes(Store(copy), "texture-filterbank", -1, Cs=[64], ks=[4], dataset=["synth_visa"], split=None,
                       epochs=1, batch_tokens=256, preprocess="standardize,constant", engine="local",
                       run_name="order")
        sae_id = r.models[0]["sae_id"]
        weights.append(Store(copy).read("sae_models", where=f"sae_id = '{sae_id}'", columns=["weights"])
                       .column("weights")[0].as_py())
    assert weights[0] == weights[1]
