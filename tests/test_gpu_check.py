"""bench/gpu_check: the GPU check's three parts at tiny sizes on CPU (so the script cannot rot while no GPU is
lent), its shell wrapper (syntax, part isolation, exit status, summary files), the ``--plan`` device calls, and
the lancedb stand-in it uses on the GPU machine (where lancedb is not installed) against the real lancedb."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHELL = ROOT / "bench" / "gpu_check.sh"


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("bench_gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


gcheck = _load_gpu_check()


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_part(name: str, r: dict) -> None:
    assert r["status"] == "ok", (name, r.get("error"), r.get("traceback"))
    assert r["figures"], name
    for f in r["figures"]:
        assert _numeric(f["value"]), (name, f)
        assert f["ratio"] is None or _numeric(f["ratio"]), (name, f)
    assert any(_numeric(f["ratio"]) for f in r["figures"]), name


@pytest.mark.ray
@pytest.mark.timeout(300)  # ~30 s on an idle 2-CPU machine; the margin is for a loaded one
def test_cpu_smoke_runs_every_part_and_reports_figures_with_ratios(ray_cluster, tmp_path):
    sz = gcheck.sizes_for("cpu-smoke")
    work = tmp_path / "work"
    results = {part: gcheck.run_part(part, sz, work, **({"lancedb_shim": "auto"} if part == "extract" else {}))
               for part in gcheck.PARTS}
    summary, text = gcheck.summarize(results, "cpu-smoke", gcheck.preflight())
    json.dumps(summary)  # what lands in summary.json
    assert summary["ok"] and set(summary["parts"]) == set(gcheck.PARTS)
    for part, r in summary["parts"].items():
        _check_part(part, r)
        assert f"[{part}] OK" in text
        assert json.loads((work / f"{part}.json").read_text())["status"] == "ok"  # what gpu_check.sh collects

    ext = {f["name"]: f for f in summary["parts"]["extract"]["figures"]}
    assert ext["pipeline / bare forward"]["gpu_md"] == 0.24  # each figure sits beside the H200 reference it is checked against
    assert ext["bare forward, Backbone.encode (images/s)"]["gpu_md"] == 400.0
    assert ext["patch_tokens rows in the store / images"]["value"] == 1.0
    assert "pipeline once running (images/s)" in ext
    speed = [f for f in summary["parts"]["sae_speed"]["figures"] if f["name"].startswith("dense TopK step")]
    assert [f["gpu_md"] for f in speed] == [3.5e6, 0.27e6]
    assert any(f["name"].startswith("ours / dense") for f in summary["parts"]["sae_speed"]["figures"])
    det = summary["parts"]["sae_train"]["details"]
    assert det["roundtrip_exact"] and det["resume_bit_identical"] and det["deterministic_resume_bit_identical"]
    assert all(a < b for a, b in zip(det["heldout_after"], det["heldout_before"]))


def test_shell_script_parses():
    out = subprocess.run(["bash", "-n", str(SHELL)], capture_output=True, text=True)
    assert out.returncode == 0 and not out.stderr, out.stderr  # bash -n: syntax only, nothing run


def test_plan_names_the_carried_folders_and_fits_the_device_limits():
    out = subprocess.run(["bash", str(SHELL), "--plan"], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable}).stdout
    calls = [json.loads(line[len("run "):]) for line in out.splitlines() if line.startswith("run {")]
    assert calls[0]["carry"] == [".gpu/a"] and calls[0]["command"] == "bash .gpu/a/install.sh"
    assert calls[1]["carry"] == [".gpu/b"] and calls[1]["command"].startswith("bash .gpu/b/install.sh")
    assert "bash bench/gpu_check.sh" in calls[1]["command"]
    for c in calls:
        assert len(c["command"]) <= 2000 and 1 <= c["timeout_s"] <= 600 and len(c.get("carry", [])) <= 8
    assert "pack-gpu-wheels" in out and "give_back" in out
    # the check itself: every part's timeout plus the preflight within 8 minutes, inside call 2's limit
    assert sum(gcheck.TIMEOUTS["gpu"].values()) <= 480 < calls[1]["timeout_s"]


def test_shell_runs_every_part_and_exits_nonzero_when_one_fails(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SHELL), "--cpu-smoke", "--skip-preflight", "--parts", "sae_speed,sae_train",
                           "--fail-part", "sae_speed,sae_train"], check=False, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": str(out)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["ok"]
    assert {p: r["status"] for p, r in summary["parts"].items()} == {"sae_speed": "fail", "sae_train": "fail"}
    assert "injected" in summary["parts"]["sae_train"]["error"]  # the second part ran although the first failed
    assert (out / "summary.txt").exists() and (out / "sae_speed.log").exists() and (out / "sae_train.log").exists()
    assert "SOME PARTS FAILED" in proc.stdout


STORE_OPS = r'''
import numpy as np
from spg_dist.store import Store, images, load_schema, tokens, tokens_to_arrow, write_fragment


def ops(path):
    store = Store(path)
    out = {"has_before": store.has_table("images")}
    rows = [dict(image_id=f"d/{i}", dataset="d", category="O'Brien" if i % 2 else "c", split="train", label=0,
                 defect_type="good", image_uri=f"/x/{i}.png", mask_uri="", width=8 + i, height=8) for i in range(3)]
    images.upsert(store, rows)
    rows[1]["width"] = 99
    images.upsert(store, rows)  # a repeated upsert replaces, never duplicates
    out["images"] = store.count("images")
    out["width_1"] = images.rows(store, image_ids=["d/1"]).column("width").to_pylist()
    out["obrien"] = sorted(images.rows(store, dataset="d").filter(
        __import__("pyarrow.compute").compute.equal(images.rows(store, dataset="d").column("category"), "O'Brien"))
        .column("image_id").to_pylist())
    out["stored_ids"] = sorted(images.stored_ids(store, ["d/0", "d/2", "d/9"]))
    n = 4
    meta = dict(backbone=["bb"] * n, layer=[1] * n, image_id=[f"d/{i}" for i in range(n)], dataset=["d"] * n,
                category=["c'1" if i < 2 else "c2" for i in range(n)], split=["train"] * n, label=[0] * n,
                image_size=[32] * n)
    table = tokens_to_arrow(meta, np.arange(n * 2 * 2 * 3, dtype=np.float32).reshape(n, 2, 2, 3), "w")
    frags = write_fragment(store.lance_uri("patch_tokens"), table, load_schema("patch_tokens"))
    out["committed"] = store.commit_fragments("patch_tokens", frags)
    frags = write_fragment(store.lance_uri("patch_tokens"), table, load_schema("patch_tokens"))
    out["committed_again"] = store.commit_fragments("patch_tokens", frags)  # keys already there: dropped
    meta_t, toks = tokens.load_tokens(store, "bb", 1, category="c'1")
    out["c1_ids"] = meta_t.column("image_id").to_pylist()
    out["c1_sum"] = float(toks.astype("float64").sum())
    out["keys"] = sorted(map(list, tokens.stored_keys(store, "bb", [1])))
    out["counts"] = store.counts()
    out["tables"] = sorted(store.db.list_tables().tables)
    return out
'''


def test_lancedb_shim_serves_the_store_like_lancedb(tmp_path):
    """Where lancedb is missing (the GPU machine) the extract part writes a stand-in; the store must read and
    write through it exactly as through lancedb (the filters too: quotes, IN lists)."""
    ns: dict = {}
    exec(STORE_OPS, ns)  # noqa: S102 - the same source runs here (real lancedb) and in the subprocess (shim)
    real = ns["ops"](str(tmp_path / "real"))
    shim = gcheck.write_lancedb_shim(tmp_path / "shim")
    code = (f"import json, sys\nsys.path.insert(0, {str(shim)!r})\nimport lancedb\nassert lancedb.SHIM\n"
            f"{STORE_OPS}\nprint('RESULT ' + json.dumps(ops({str(tmp_path / 'shimmed')!r})))\n")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": f"{shim}{os.pathsep}{ROOT}"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert got == json.loads(json.dumps(real))
    assert real["images"] == 3 and real["committed"] == 4 and real["committed_again"] == 0
    assert sorted(real["c1_ids"]) == ["d/0", "d/1"]
    # the shim's layout is lancedb's: the real lancedb opens what the shim wrote
    import lancedb

    assert lancedb.connect(str(tmp_path / "shimmed")).open_table("patch_tokens").count_rows() == 4
