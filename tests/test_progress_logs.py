"""Progress and logs: training lines that reach the driver while the workers run, an extraction with no Ray noise
on stderr, a no-op re-run that starts no Ray, and Ctrl-C that keeps what was written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spg_dist.data.spec import list_records
from spg_dist.store import Store, load_tokens

pytestmark = pytest.mark.ray
SIZE = 64  # tiny-dinov3, 4x4 grid
ROOT = Path(__file__).resolve().parents[1]
NOISE = ("max_restarts", " ERROR ", "INFO", "core_worker", "WARNING")


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
               PYTHONPATH=str(ROOT))
    for name in ("RAY_ADDRESS", "TQDM_DISABLE"):  # a local Ray of its own; the bar shown, as a user sees it
        env.pop(name, None)
    return env


def _spg_extract(store: Path, data: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "spg_dist.cli", "extract", "--store", str(store), "--dataset", f"mvtec:{data}",
           "--backbone", "tiny-dinov3", "--image-size", str(SIZE), "--num-cpus", "1"]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def cli_store(synth_mvtec, tmp_path_factory):
    """``spg extract --num-cpus 1`` in a subprocess of its own (its own local Ray), on a fresh store."""
    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "ds"
    shutil.copytree(synth_mvtec, data)
    return tmp / "store", data, _spg_extract(tmp / "store", data)


def test_extraction_stderr_has_no_ray_noise(cli_store):
    store, data, proc = cli_store
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = len(list_records(f"mvtec:{data}"))
    assert f"{n} patch_tokens rows written" in proc.stdout
    noisy = [line for line in proc.stderr.splitlines() if any(w in line for w in NOISE)]
    assert not noisy, "\n".join(noisy[:20])


def test_noop_rerun_starts_no_ray(cli_store):
    store, data, first = cli_store
    assert first.returncode == 0, first.stderr[-3000:]
    n = len(list_records(f"mvtec:{data}"))
    code = ("import sys\n"
            "from spg_dist.cli import main\n"
            f"args = ['extract', '--store', {str(store)!r}, '--dataset', {f'mvtec:{data}'!r}, '--backbone', "
            f"'tiny-dinov3', '--image-size', '{SIZE}', '--num-cpus', '1']\n"
            "try:\n    main(args, standalone_mode=False)\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('RAY_IMPORTED', 'ray' in sys.modules)\n"
            "import ray\nprint('RAY_INITIALIZED', ray.is_initialized())\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300,
                          cwd=ROOT)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"0 patch_tokens rows written, {n} images already stored" in proc.stdout
    assert "RAY_IMPORTED False" in proc.stdout and "RAY_INITIALIZED False" in proc.stdout
    assert seconds < 60, seconds  # imports only (a few seconds on an idle machine); a Ray start alone is ~10 s


def _keys(store: Store, bid: str) -> list[tuple]:
    t = store.read("patch_tokens")
    return list(zip(t.column("backbone").to_pylist(), t.column("layer").to_pylist(),
                    t.column("image_id").to_pylist()))


@pytest.fixture(scope="module")
def interrupted(ray_cluster, synth_mvtec, tmp_path_factory):
    """An extraction interrupted (KeyboardInterrupt, as Ctrl-C raises) right after its first batch arrived."""
    from spg_dist.ray.extract import extract

    tmp = tmp_path_factory.mktemp("ctrlc")
    store = Store(tmp / "store")
    spec = f"mvtec:{synth_mvtec}"
    seen: list[int] = []

    def on_rows(n: int) -> None:
        seen.append(n)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract(store, spec, "tiny-dinov3", image_size=SIZE, batch_size=4, rows_per_fragment=4, commit_every_s=3600,
                progress=False, on_rows=on_rows)
    return store, spec, seen


def test_ctrl_c_commits_what_was_written_and_a_rerun_completes(interrupted):
    from spg_dist.ray.extract import extract

    store, spec, seen = interrupted
    n = len(list_records(spec))
    assert seen and 0 < seen[0] < n
    keys = _keys(store, "tiny-dinov3")
    assert len(keys) == len(set(keys)) == seen[0]  # the first batch, committed before the interrupt propagated
    meta, toks = load_tokens(store, "tiny-dinov3", 3)
    assert toks.shape == (seen[0], 4, 4, 64)  # readable, whole
    images = set(store.read("images").column("image_id").to_pylist())
    assert set(meta.column("image_id").to_pylist()) <= images  # tokens never without their images rows

    again = extract(store, spec, "tiny-dinov3", image_size=SIZE, batch_size=4, progress=False)
    assert again.images_skipped == seen[0] and again.rows_written == n - seen[0]
    keys = _keys(store, "tiny-dinov3")
    assert len(keys) == len(set(keys)) == n


@pytest.mark.slow
def test_training_progress_reaches_the_driver_while_workers_run(interrupted, monkeypatch):
    from spg_dist.ray import progress
    from spg_dist.ray.extract import extract
    from spg_dist.ray.train_sae import train_saes

    store, spec, _ = interrupted
    extract(store, spec, "tiny-dinov3", image_size=SIZE, batch_size=4, progress=False)  # whole (no-op after the test)
    monkeypatch.setattr(progress, "RELAY_PERIOD_S", 0.2)
    lines: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    res = train_saes(store, "tiny-dinov3", 3, Cs=[64], ks=[4], split=None, token_budget=64 * 600, batch_tokens=64,
                     log_every=100, checkpoint_every=10_000, run_name="progress-test",
                     echo=lambda line: lines.append((time.perf_counter(), line)))
    end = time.perf_counter()
    steps = [(t, line) for t, line in lines if " step " in line and "tokens/s" in line and "nmse" in line]
    assert len(steps) >= 2, lines
    assert steps[-1][1].startswith("[train-sae] progress-test step 600/600")
    assert "ETA" in steps[0][1] and "dead" in steps[0][1] and "loss" in steps[0][1]
    assert lines[0][1].startswith("[train-sae] progress-test: 600 steps")  # before Ray Train started
    # lines came as the workers ran (several drains), not all at once at the end
    assert t0 < steps[0][0] < steps[-1][0] - 0.1 < end
    assert res.models and res.models[0]["steps"] == 600
