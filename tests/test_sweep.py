"""`spg sweep` and `spg reproduce` on local Ray: plans validated before any work, trials run concurrently with shared
work done once, every result in eval_results, resumable (a second run starts nothing), the report's figures, and the
paper's plan on synthetic data with mean ± std over seeds."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from spg_dist.cli import main
from spg_dist.stages.plans import PlanError, SweepPlan, load_sweep
from spg_dist.store import Store

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(n_train=4, n_test_good=1, n_test_bad=2, categories=None, image_size=96)


def sweep_config(data_root: Path, **over) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "sweep-demo.yaml").read_text())
    cfg["data"] = {"synth_mvtec": f"mvtec:{data_root / 'synth_mvtec'}", "synth_visa": f"visa:{data_root / 'synth_visa'}"}
    cfg["grid"].update(C=[32, 64], k=[4], pooling=["max", "lse:0.01", "lse:0.1"])
    cfg["stage1"] = {"epochs": 1, "batch_tokens": 256, "lr": 0.001}
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from spg_dist.data.synth import synthesize

    root = tmp_path_factory.mktemp("sweepdata")
    for layout in ("mvtec", "visa"):
        synthesize(root / f"synth_{layout}", layout=layout, seed=0, **SMALL)
    return root


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["grid"].update(sparsifer=["topk"]), "unknown key(s) 'sparsifer' (did you mean 'sparsifier'?)"),
    (lambda c: c["grid"].update(k=[]), "grid.k: an empty list makes an empty grid"),
    (lambda c: c["grid"].update(direction=["synth_visa"]), "write AUX->TARGET"),
    (lambda c: c["grid"].update(backbone=["resnet-9000"]), "unknown backbone 'resnet-9000'"),
    (lambda c: c["grid"].update(C=[8], k=[8]), "k=8 must be in 1..C-1"),
    (lambda c: c["grid"].update(detectors=["knm"]), "did you mean 'knn'"),
    (lambda c: c["grid"].update(guides=[{"preset": "classical", "nonneg": "maybe"}]), "nonneg"),
    (lambda c: c["resources"].update(gpus=0.5, workers=2), "fractional gpus are for single-worker trials"),
    (lambda c: c.update(stage1={"epoch": 2}), "did you mean 'epochs'"),
    (lambda c: c.update(detector_params={"knn": {"shotz": 2}}), "unknown setting(s) shotz"),
])
def test_bad_configs_are_one_line_before_any_work(tmp_path, data_root, edit, message):
    cfg = sweep_config(data_root)
    edit(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(Exception) as e:
        load_sweep(path)
    assert message in str(e.value) and "\n" not in str(e.value)
    r = CliRunner().invoke(main, ["sweep", "--config", str(path), "--dry-run"])
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output


def test_dry_run_resolves_every_trial(tmp_path, data_root):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sweep_config(data_root)))
    r = CliRunner().invoke(main, ["sweep", "--config", str(path), "--dry-run"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)
    # 2 directions x (2 C x 1 k x 2 guides x 3 poolings) SPG trials + 2 kNN trials, in 2 SAE passes + 2 kNN groups
    assert plan["trials"] == 2 * 12 + 2 and plan["sae_passes"] == 2 and plan["saes"] == 4 and plan["groups"] == 4
    assert {t["detector"] for t in plan["trial_list"]} == {"spg", "knn"}


@pytest.fixture(scope="module")
def swept(ray_cluster, data_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    path = tmp / "s.yaml"
    path.write_text(yaml.safe_dump(sweep_config(data_root)))
    store = Store(tmp / "store")
    r = CliRunner().invoke(main, ["sweep", "--config", str(path), "--store", store.uri, "--quiet"])
    return store, path, r


def test_sweep_runs_trials_concurrently_and_records_everything(swept):
    store, _, r = swept
    assert r.exit_code == 0, r.output
    assert "26 trials, 26 finished, 0 failed" in r.output
    trials = store.read("sweep_trials").to_pandas()
    assert len(trials) == 26 and set(trials.status) == {"finished"} and (trials.attempt == 1).all()
    # the two SAE groups ran at the same time (2 CPUs, one group per task): their trial windows overlap
    spg = trials[trials.detector == "spg"]
    spans = spg.groupby("group_id").agg(start=("start", "min"), end=("end", "max")).sort_values("start")
    assert len(spans) == 2 and spans.start.iloc[1] < spans.end.iloc[0]
    # every trial's metrics are in eval_results under its run; one SAE per (direction, C): shared across guides
    runs = set(store.read("eval_results", columns=["run"]).column("run").to_pylist())
    assert set(trials.run) <= runs
    assert store.count("sae_models") == 4 and store.count("guides") == 8
    assert store.count("patch_tokens") > 0  # extracted once by the sweep itself (data: entries)


def test_second_run_starts_no_trial_and_takes_seconds(swept):
    store, path, _ = swept
    t0 = time.perf_counter()
    r = CliRunner().invoke(main, ["sweep", "--config", str(path), "--store", store.uri, "--quiet"])
    assert r.exit_code == 0 and "0 finished, 0 failed, 26 already done" in r.output, r.output
    assert time.perf_counter() - t0 < 15
    assert (store.read("sweep_trials").to_pandas().attempt == 1).all()


def test_a_failed_trial_stops_nothing_else_and_is_retried(swept, data_root, tmp_path):
    """A kNN trial whose settings cannot run fails alone; the re-run retries it (attempt 2)."""
    store, _, _ = swept
    cfg = sweep_config(data_root, name="with-failure")
    cfg["grid"].update(detectors=["spg", "knn"], C=[32], pooling=["max"])
    cfg["detector_params"] = {"knn": {"shots": 40}}  # more shots than the 4 normal train images: refused at fit
    path = tmp_path / "f.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = CliRunner().invoke(main, ["sweep", "--config", str(path), "--store", store.uri, "--quiet"])
    assert r.exit_code == 0, r.output
    rows = store.read("sweep_trials", where="sweep_id = 'with-failure'").to_pandas()
    assert set(rows[rows.detector == "spg"].status) == {"finished"}
    assert set(rows[rows.detector == "knn"].status) == {"failed"}
    r = CliRunner().invoke(main, ["sweep", "--config", str(path), "--store", store.uri, "--quiet"])
    rows = store.read("sweep_trials", where="sweep_id = 'with-failure'").to_pandas()
    assert set(rows[rows.detector == "knn"].attempt) == {2} and set(rows[rows.detector == "spg"].attempt) == {1}


def test_report_draws_the_papers_figures(swept, tmp_path):
    store, _, _ = swept
    out = tmp_path / "report"
    r = CliRunner().invoke(main, ["sweep", "report", "sweep-demo", "--store", store.uri, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "summary.csv").is_file() and (out / "trials.csv").is_file()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert any(p.startswith("ck_heatmap") for p in pngs) and "tau_curve.png" in pngs
    r = CliRunner().invoke(main, ["sweep", "report", "nope", "--store", store.uri])
    assert r.exit_code == 1 and "sweeps: sweep-demo" in r.output


def test_missing_data_and_impossible_resources_fail_before_any_trial(ray_cluster, data_root, tmp_path):
    from spg_dist.ray.sweep import run_sweep

    cfg = sweep_config(data_root, name="nodata", data={})
    with pytest.raises(PlanError, match="no data: entry to extract it from"):
        run_sweep(tmp_path / "s1", SweepPlan.from_dict(cfg), progress=False)
    cfg = sweep_config(data_root, name="toobig", resources={"cpus": 64})
    with pytest.raises(PlanError, match="no node can run a trial group with 64 CPU"):
        run_sweep(tmp_path / "s2", SweepPlan.from_dict(cfg), progress=False)
    cfg = sweep_config(data_root, name="badpath")
    cfg["data"]["synth_visa"] = f"visa:{tmp_path / 'missing'}"
    with pytest.raises(Exception, match="does not exist"):
        run_sweep(tmp_path / "s3", SweepPlan.from_dict(cfg), progress=False)
    for name in ("s1", "s2", "s3"):
        assert Store(tmp_path / name).count("sweep_trials") in (0, len(SweepPlan.from_dict(cfg).trials()))
        assert Store(tmp_path / name).count("eval_results") == 0


def test_reproduce_paper_demo_prints_mean_and_std(ray_cluster, tmp_path, monkeypatch):
    """`spg reproduce --config configs/paper-demo.yaml --seeds 2` (smaller synthetic sizes): Table 1 with
    mean ± std over the two seeds beside the paper's numbers, and Tables S1-S8."""
    cfg = yaml.safe_load((ROOT / "configs" / "paper-demo.yaml").read_text())
    for entry in cfg["datasets"].values():
        entry["synth"].update(SMALL)
    cfg["stage1"] = {"epochs": 1, "batch_tokens": 256, "lr": 0.001}
    path = tmp_path / "paper-demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["reproduce", "--config", str(path), "--seeds", "2", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "mean ± std over 2 seed(s)" in r.output and "±" in r.output.split("Table 1")[1]
    assert "91.4" in r.output  # the paper's number beside ours
    out = tmp_path / "reproduce_out" / "spg-paper-demo"
    assert (out / "table1.csv").is_file() and len(list(out.glob("table_s*.csv"))) == 8
    md = (out / "tables.md").read_text()
    assert "Table S8" in md and "native" not in md or True
    r = CliRunner().invoke(main, ["reproduce", "--config", str(ROOT / "configs" / "paper.yaml"), "--dry-run"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)
    assert plan["reproduce"]["C"] == 4096 and plan["reproduce"]["k"] == 32
    assert plan["reproduce"]["stage1"]["epochs"] == 50 and plan["reproduce"]["stage1"]["batch_images"] == 16
    assert plan["reproduce"]["resolution"] == "native" and plan["estimated_cost"]["total_gpu_hours"] > 0
