"""The README's "your own detector" example: registered in a few lines, run by `detect` from the store through the
one evaluation loop, its rows next to the built-in detectors' in eval_results, and listed by `spg detectors`."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from spg_dist.evaluation import METRICS
from spg_dist.stages.detect import detect

sys.path.insert(0, str(Path(__file__).parent / "examples"))
from mean_distance import MeanDistance  # noqa: E402  (registers "mean-distance")

from test_stage2 import make_stage2_store  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The example registers itself on import; leave the registry as other tests expect it afterwards."""
    from spg_dist.detectors import register_detector
    from spg_dist.detectors.registry import unregister_detector

    register_detector(MeanDistance, overwrite=True)
    yield
    unregister_detector("mean-distance")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_stage2_store(tmp_path_factory.mktemp("custom"))


def test_custom_detector_runs_from_the_store(store):
    result = detect(store, "mean-distance", "aux", backbone="bb", shots=2)
    assert result.detector == "mean-distance" and list(result.table.columns) == list(METRICS)
    # the planted anomalies point along e0, normal patches along e1 (+ a category axis): far from the normal mean
    assert result.mean["pixel_auroc"] > 0.9 and result.mean["image_auroc"] > 0.9
    rows = store.read("eval_results", columns=["detector", "shots", "params"]).to_pylist()
    assert {r["detector"] for r in rows} == {"mean-distance"} and {r["shots"] for r in rows} == {2}


def test_custom_detector_by_hand_equals_the_loop(store):
    """The loop's patch scores are exactly the detector's own on the same shots."""
    from spg_dist.detectors import FitData
    from spg_dist.stages.inputs import InputSource

    src = InputSource(store, "bb", [3], "aux")
    det = MeanDistance(shots=2).fit(FitData(shots=src.shots(["a0"], 2)))
    test = src.test_set("a0")
    x = test.layer().astype(np.float32)
    want = 1 - (x @ det.mean) / np.linalg.norm(x, axis=-1)
    np.testing.assert_allclose(det.score(test), want, rtol=1e-6)


def test_listed_by_spg_detectors():
    from click.testing import CliRunner

    from spg_dist.cli import main

    r = CliRunner().invoke(main, ["detectors"])
    assert r.exit_code == 0, r.output
    for name in ("spg", "knn", "musc", "lake", "foundad", "visualad", "mean-distance"):
        assert name in r.output


def test_readme_shows_the_example_file_verbatim():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = (Path(__file__).parent / "examples" / "mean_distance.py").read_text()
    code = example.split('"""', 2)[2].strip()  # the file without its module docstring
    assert code in readme
