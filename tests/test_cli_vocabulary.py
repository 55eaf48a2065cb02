"""The CLI speaks one vocabulary: --dataset LAYOUT:PATH only where images are read, --aux/--target NAME for stored
datasets, --workers/--cpus-per-worker/--gpus-per-worker for parallelism, --address/--num-cpus/-q/-v on every stage;
old spellings still work with one note line. On a cluster relative paths are refused before connecting, Ctrl-C is
one line and exit 130, a missing store is refused (not created), unknown names say what is close and where to see
them all. Fast: CliRunner, a tiny store, the stage functions monkeypatched; no Ray."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from spg_dist.cli import main
from spg_dist.cli.base import COMMAND_ORDER, INTERRUPTED

from test_stage2 import SAE_ID, make_stage2_store, register_sae_with_atoms

STAGES = ("extract", "train-sae", "encode", "train-guides", "evaluate", "detect", "sweep", "reproduce")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = make_stage2_store(tmp_path_factory.mktemp("vocab"))
    register_sae_with_atoms(s)
    return s


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return CliRunner()


def _commands(group: click.Group, prefix=()):
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))


def _visible(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params if isinstance(p, click.Option) and not p.hidden for o in p.opts + p.secondary_opts}


def _capture(monkeypatch, module: str, func: str, result=None):
    calls: list[dict] = []

    def fake(*args, **kwargs):
        calls.append(dict(kwargs, _args=args))
        if isinstance(result, BaseException) or (isinstance(result, type) and issubclass(result, BaseException)):
            raise result
        return result

    monkeypatch.setattr(importlib.import_module(module), func, fake)
    return calls



# ---------------------------------------------------------------------------------------------------- the surface

def test_help_lists_commands_in_pipeline_order(runner):
    r = runner.invoke(main, ["--help"])
    assert r.exit_code == 0
    listed = [ln.split()[0] for ln in r.output.split("Commands:")[1].splitlines() if ln.strip()]
    assert listed == [c for c in COMMAND_ORDER if c in listed] and listed[:3] == ["datasets", "extract", "train-sae"]


def test_version(runner):
    r = runner.invoke(main, ["--version"])
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[0].startswith("spg_dist ") and any(ln.startswith("ray ") for ln in lines)
    assert any(ln.startswith("lancedb ") for ln in lines) and any(ln.startswith("torch ") for ln in lines)


def test_every_visible_option_has_help():
    missing = [f"spg {' '.join(path)} {p.opts[0]}" for path, cmd in _commands(main) for p in cmd.params
               if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()]
    assert missing == []


def test_one_vocabulary_on_every_stage():
    cmds = dict(_commands(main))
    for name in STAGES:
        opts = _visible(cmds[(name,)])
        assert {"--address", "--num-cpus", "-q", "--quiet", "-v", "--verbose"} <= opts, name
        assert not opts & {"--actors", "--cpus-per-actor", "--gpus-per-actor", "--gpu", "--input-scaling"}, name
    assert "--dataset" in _visible(cmds[("extract",)])
    for name in ("train-sae", "encode", "train-guides", "evaluate", "detect"):
        assert "--dataset" not in _visible(cmds[(name,)]), name
    assert {"--workers", "--cpus-per-worker", "--gpus-per-worker"} <= _visible(cmds[("extract",)])
    assert {"--workers", "--cpus-per-worker", "--gpus-per-worker", "--aux"} <= _visible(cmds[("train-sae",)])
    assert {"--workers", "--gpus-per-worker", "--target"} <= _visible(cmds[("encode",)])
    data_help = next(p.help for p in cmds[("reproduce",)].params if p.name == "data")
    assert "folder on disk" in data_help and "not a stored dataset name" in data_help


# ---------------------------------------------------------------------------------------------------- aliases

def test_train_sae_old_spellings_still_work_with_a_note(store, runner, monkeypatch):
    calls = _capture(monkeypatch, "spg_dist.ray.train_sae", "train_saes", types.SimpleNamespace(reused=False, models=[]))
    r = runner.invoke(main, ["train-sae", "--store", store.uri, "--backbone", "bb", "--dataset", "aux", "--gpu",
                             "--input-scaling", "unit_mean_sq_norm", "--preprocess", "center", "--engine", "local"])
    assert r.exit_code == 0, r.output
    (kw,) = calls
    assert kw["dataset"] == ["aux"] and kw["use_gpu"] is True and kw["preprocess"] == "center,scale"
    assert "note: --dataset is now --aux (a stored dataset name); the old name will go" in r.stderr
    assert "note: --gpu is now --gpus-per-worker" in r.stderr and "note: --input-scaling is now" in r.stderr
    calls.clear()
    r = runner.invoke(main, ["train-sae", "--store", store.uri, "--backbone", "bb", "--aux", "aux,normals",
                             "--gpus-per-worker", "0", "--engine", "local"])
    assert r.exit_code == 0 and "note:" not in r.stderr
    assert calls[0]["dataset"] == ["aux", "normals"] and calls[0]["use_gpu"] is False


def test_encode_target_and_workers(store, runner, monkeypatch):
    calls = _capture(monkeypatch, "spg_dist.ray.encode", "encode", types.SimpleNamespace(summary=lambda: "ok"))
    r = runner.invoke(main, ["encode", "--store", store.uri, "--sae", SAE_ID, "--dataset", "aux", "--actors", "2",
                             "--quiet"])
    assert r.exit_code == 0, r.output
    assert calls[0]["dataset"] == ["aux"] and calls[0]["num_actors"] == 2 and calls[0]["progress"] is False
    assert "note: --dataset is now --target (a stored dataset name)" in r.stderr
    assert "note: --actors is now --workers" in r.stderr
    r = runner.invoke(main, ["encode", "--store", store.uri, "--sae", SAE_ID, "--target", "tgt", "--workers", "3",
                             "--gpus-per-worker", "1"])
    assert r.exit_code == 0 and calls[1]["dataset"] == ["tgt"] and calls[1]["num_actors"] == 3
    assert calls[1]["use_gpu"] is True


def test_extract_workers_and_relative_paths_resolved_locally(runner, monkeypatch, tmp_path):
    result = types.SimpleNamespace(errors=[], summary=lambda: "done")
    calls = _capture(monkeypatch, "spg_dist.ray.extract", "extract", result)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(main, ["extract", "--dataset", "mvtec:data/mv", "--store", "st", "--actors", "3",
                             "--cpus-per-actor", "2", "--gpus-per-actor", "0.5"])
    assert r.exit_code == 0, r.output
    kw = calls[0]
    assert kw["num_actors"] == 3 and kw["cpus_per_actor"] == 2.0 and kw["gpus_per_actor"] == 0.5
    assert kw["dataset"] == f"mvtec:{tmp_path}/data/mv" and kw["store"] == str(tmp_path / "st")
    assert r.stderr.count("note:") == 3
    r = runner.invoke(main, ["extract", "--dataset", "mvtec:data/mv", "--store", "st", "--workers", "2",
                             "--cpus-per-worker", "4", "--gpus-per-worker", "1"])
    assert r.exit_code == 0 and (calls[1]["num_actors"], calls[1]["cpus_per_actor"], calls[1]["gpus_per_actor"]) \
        == (2, 4.0, 1.0)


# ---------------------------------------------------------------------------------------------------- cluster paths

@pytest.mark.parametrize("args,bad", [
    (["extract", "--dataset", "mvtec:data/mv", "--store", "/abs/store"], "--dataset 'data/mv'"),
    (["extract", "--dataset", "mvtec:/data/mv", "--store", "store"], "--store 'store'"),
    (["extract", "--dataset", "mvtec:/data/mv", "--store", "s3://b/s", "--weights", "./models/d"], "--weights"),
    (["train-sae", "--store", "store", "--backbone", "bb"], "--store 'store'"),
    (["encode", "--store", "store", "--sae", "x"], "--store 'store'"),
    (["detect", "--store", "store", "--method", "knn", "--target", "t"], "--store 'store'"),
    (["train-guides", "--store", "store", "--sae", "x", "--aux", "a"], "--store 'store'"),
    (["evaluate", "--store", "store", "--guides", "g", "--target", "t"], "--store 'store'"),
    (["reproduce", "--config", "configs/paper.yaml", "--data", "mvtec=data/mvtec"], "--data mvtec 'data/mvtec'"),
])
def test_relative_paths_are_refused_on_a_cluster(runner, monkeypatch, args, bad):
    calls = _capture(monkeypatch, "spg_dist.ray.extract", "extract", types.SimpleNamespace(errors=[], summary=str))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # nothing listens: the check must come before connecting
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith("Error: ") and bad in line and "is relative" in line, line
    assert "absolute path every node can read, or s3://" in line and not calls


def test_absolute_and_s3_paths_pass_on_a_cluster(runner, monkeypatch):
    calls = _capture(monkeypatch, "spg_dist.ray.extract", "extract", types.SimpleNamespace(errors=[], summary=str))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    r = CliRunner().invoke(main, ["extract", "--dataset", "mvtec:/data/mv@mv", "--store", "s3://b/s",
                                  "--weights", "/models/d"])
    assert r.exit_code == 0, r.output
    assert calls[0]["dataset"] == "mvtec:/data/mv@mv" and calls[0]["store"] == "s3://b/s"


def test_a_job_entrypoint_refuses_relative_paths(monkeypatch):
    from spg_dist.cli import extract_cmd  # what jobs/extract.py runs

    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    r = CliRunner().invoke(extract_cmd, ["--dataset", "mvtec:/d", "--store", "rel/store"])
    assert r.exit_code == 1 and "--store 'rel/store' is relative" in r.output


# ---------------------------------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_is_one_line_and_exit_130(store, runner, monkeypatch):
    _capture(monkeypatch, "spg_dist.ray.train_sae", "train_saes", KeyboardInterrupt())
    r = runner.invoke(main, ["train-sae", "--store", store.uri, "--backbone", "bb", "--aux", "aux", "--engine", "local"])
    assert r.exit_code == 130 and r.stderr.strip() == INTERRUPTED
    assert "Traceback" not in r.output and "Aborted" not in r.output


# ---------------------------------------------------------------------------------------------------- did you mean

@pytest.mark.parametrize("args,expect", [
    (["train-sae", "--backbone", "bb", "--aux", "auxx"], ["did you mean 'aux'", "spg datasets list"]),
    (["encode", "--sae", SAE_ID + "x"], [f"did you mean {SAE_ID!r}", "spg saes"]),
    (["train-guides", "--sae", "bb/L3/stage2-tset", "--aux", "aux"], [f"did you mean {SAE_ID!r}", "spg saes"]),
    (["train-guides", "--sae", SAE_ID, "--aux", "tgtt"], ["did you mean 'tgt'"]),
    (["evaluate", "--guides", "nope", "--target", "tgt"], ["unknown guide set 'nope'", "known:"]),
    (["detect", "--method", "knm", "--target", "tgt"], ["did you mean 'knn'", "spg detectors"]),
    (["detect", "--method", "knn", "--target", "tg"], ["did you mean 'tgt'", "spg datasets list"]),
    (["atoms", "top", "--sae", "nope", "--atom", "1"], ["unknown SAE 'nope'", "spg saes"]),
    (["saes", "show", "bb/L3/stage2-tes"], [f"did you mean {SAE_ID!r}"]),
])
def test_unknown_names_say_what_is_close(store, runner, args, expect):
    if args[0] == "saes":
        args = ["saes", "--store", store.uri, *args[1:]]
    else:
        args = [*args[:1], "--store", store.uri, *args[1:]]
        if args[0] == "atoms":
            args = ["atoms", "top", "--store", store.uri, *args[4:]]
    r = runner.invoke(main, args)
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and all(e in lines[0] for e in expect), r.output


def test_unknown_backbone_says_what_is_close(runner, tmp_path):
    r = runner.invoke(main, ["extract", "--dataset", f"mvtec:{tmp_path}", "--backbone", "dinov3-vitl61",
                             "--store", str(tmp_path / "s")])
    assert r.exit_code == 1 and "did you mean 'dinov3-vitl16'" in r.output and "spg backbones" in r.output


# ---------------------------------------------------------------------------------------------------- missing store

@pytest.mark.parametrize("args", [
    ["saes"], ["store"], ["store", "check"], ["train-sae", "--backbone", "bb"], ["encode", "--sae", "x"],
    ["train-guides", "--sae", "x", "--aux", "a"], ["evaluate", "--guides", "g", "--target", "t"],
    ["detect", "--method", "knn", "--target", "t"], ["atoms", "stats", "--sae", "x"], ["saes", "show", "x"],
    ["datasets", "list"], ["sweep", "report", "s"],
])
def test_a_missing_store_is_refused_not_created(runner, tmp_path, args):
    where = tmp_path / "nostore"
    if args[0] in ("store", "saes") and len(args) > 1:
        args = [args[0], "--store", str(where), *args[1:]]
    elif args[0] in ("atoms", "datasets", "sweep"):
        args = [*args[:2], "--store", str(where), *args[2:]]
    else:
        args = [args[0], "--store", str(where), *args[1:]]
    r = runner.invoke(main, args)
    assert r.exit_code == 1, r.output
    assert r.output.strip() == f"Error: no store at {where} (make one with `spg extract ...` or `spg demo`; check " \
                               f"the path)"
    assert not where.exists()


# ---------------------------------------------------------------------------------------------------- inspection

def test_spg_store_shows_versions(store, runner):
    r = runner.invoke(main, ["store", "--store", store.uri])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith(f"store {store.uri} (lancedb ") and "lance " in lines[0]
    tok = next(ln for ln in lines if ln.startswith("patch_tokens"))
    assert "rows" in tok and "schema v2 (declared v2)" in tok and "lance v" in tok


def test_datasets_list(store, runner):
    r = runner.invoke(main, ["datasets", "list", "--store", store.uri])
    assert r.exit_code == 0 and [ln.split()[0] for ln in r.output.splitlines()] == ["aux", "normals", "tgt"]


def test_saes_show(store, runner, tmp_path):
    r = runner.invoke(main, ["saes", "--store", store.uri, "show", SAE_ID])
    assert r.exit_code == 0, r.output
    fields = {ln.split()[0] for ln in r.output.splitlines()}
    assert {"sae_id", "backbone", "layer", "C", "k", "steps", "nmse", "L0", "dead"} <= fields
    r = runner.invoke(main, ["saes", "--store", store.uri])
    assert r.exit_code == 0 and SAE_ID in r.output


@pytest.mark.skipif(importlib.util.find_spec("spg_dist.viz.sae_figures") is None,
                    reason="spg_dist.viz.sae_figures (write_sae_figures) is not in this checkout yet")
def test_saes_show_writes_figures(runner, tmp_path):
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    store = make_stage2_store(tmp_path)
    register_sae_with_atoms(store)
    row = store.read("sae_models").to_pylist()[0]
    store.upsert("sae_models", [dict(row, sae_id=SAE_ID + "-fig", firing_histogram_png=png.getvalue())])
    r = runner.invoke(main, ["saes", "--store", store.uri, "show", SAE_ID + "-fig", "--out", str(tmp_path / "figs")])
    assert r.exit_code == 0, r.output
    wrote = [ln.split(" ", 1)[1] for ln in r.output.splitlines() if ln.startswith("wrote ")]
    assert wrote and all(os.path.exists(p) for p in wrote)


# ---------------------------------------------------------------------------------------------------- offline hub

def test_weights_not_cached_and_no_hub_fail_in_a_second(tmp_path):
    """Without HF_HUB_OFFLINE, an unreachable hub (here: a closed local port) is found in one quick probe instead of
    minutes of download retries, and the error is one line saying what to pass."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))
    code = ("import time\nimport spg_dist.backbones.hf\nfrom spg_dist.backbones import create_backbone\n"
            "t = time.perf_counter()\n"
            "try:\n    create_backbone('dinov2-vits14', weights='nobody/no-such-model')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\nprint(f'seconds {time.perf_counter() - t:.2f}')\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert ("WeightsUnavailableError backbone dinov2-vits14: weights 'nobody/no-such-model' are not in the local "
            "cache and the hub is unreachable; pass --weights /path/to/saved/model or --weights random") in out, out
    assert float(out.split("seconds ")[1]) < 5.0, out


def test_verbose_reaches_the_ray_runtime(store, runner, monkeypatch):
    from spg_dist.ray import runtime

    if not hasattr(runtime, "ray_settings"):
        pytest.skip("spg_dist.ray.runtime has no configure_ray/ray_settings yet")
    _capture(monkeypatch, "spg_dist.ray.train_sae", "train_saes", types.SimpleNamespace(reused=False, models=[]))
    args = ["train-sae", "--store", store.uri, "--backbone", "bb", "--aux", "aux", "--engine", "local"]
    assert runner.invoke(main, [*args, "-v"]).exit_code == 0 and runtime.ray_settings()["verbose"] is True
    assert runner.invoke(main, args).exit_code == 0 and runtime.ray_settings()["verbose"] is False
