"""`spg detect`: any detector from the one store through the one loop, and every bad input as one line that says
what to run."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from spg_dist.cli import main
from spg_dist.errors import MissingInputError, NoTargetDataError, NoTokensError, UnknownNameError
from spg_dist.stages.detect import detect

from test_stage2 import make_stage2_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_stage2_store(tmp_path_factory.mktemp("detect"))


def run(store, *args):
    return CliRunner().invoke(main, ["detect", "--store", store.uri, *args])


def test_cli_runs_detectors_into_one_table(store):
    for method, extra in (("knn", ["--shots", "2"]), ("lake", ["--shots", "2"]), ("musc", [])):
        r = run(store, "--method", method, "--target", "aux", "--backbone", "bb", *extra)
        assert r.exit_code == 0, r.output
        assert "mean" in r.output and f"{method} on aux" in r.output
    rows = store.read("eval_results", columns=["detector", "resolution"]).to_pandas()
    assert set(rows.detector) == {"knn", "lake", "musc"} and rows.resolution.nunique() == 1


@pytest.mark.parametrize("args,message", [
    (["--method", "knm", "--target", "aux"], "did you mean 'knn'"),
    (["--method", "knn", "--target", "axu"], "did you mean 'aux'"),
    (["--method", "spg", "--target", "aux"], "--param sae=SAE_ID"),
    (["--method", "visualad", "--target", "tgt"], "pass --aux DATASET"),
    (["--method", "musc", "--target", "tgt", "--shots", "3"], "drop --shots"),
    (["--method", "knn", "--target", "tgt", "--backbone", "bb"], "no normal train images of category 't0'"),
    (["--method", "knn", "--target", "aux", "--backbone", "other"], "no test-split other tokens"),
    (["--method", "knn", "--target", "aux", "--backbone", "bb", "--param", "layer=-3"], "has only layers [3]"),
    (["--method", "knn", "--target", "aux", "--backbone", "bb"], "has 2 normal train image(s); 4 shots asked"),
    (["--method", "foundad", "--target", "aux", "--backbone", "bb", "--shots", "2"],
     "spg extract --dataset ... --corruptions"),
    (["--method", "knn", "--target", "aux", "--param", "shots"], "expected KEY=VALUE"),
])
def test_bad_input_is_one_line(store, args, message):
    r = run(store, *args)
    assert r.exit_code in (1, 2) and message in r.output, r.output
    assert "Traceback" not in r.output and len([x for x in r.output.splitlines() if x.strip()]) <= 3


def test_errors_are_spg_errors(store):
    with pytest.raises(UnknownNameError):
        detect(store, "nope", "aux")
    with pytest.raises(MissingInputError):
        detect(store, "spg", "aux")
    with pytest.raises(NoTargetDataError):
        detect(store, "knn", "aux", backbone="other")
    with pytest.raises(NoTokensError):
        detect(store, "knn", "aux", backbone="bb", shots=2, params={"layer": -2})
