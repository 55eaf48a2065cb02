"""The GPU check: what `bench/gpu_check.sh` runs on the lent H200 (one command, under 8 minutes), part by part.

Parts (each runs in its own process under its own timeout; each writes its figures as it goes, so a part that
times out still reports what it measured):

  extract    bf16 extraction of DINOv3 ViT-L/16 @448 (random weights) through the Ray pipeline (decode tasks ->
             GPU actor pool -> Lance fragment writers -> driver commits) into a store, against the bare forward
             of the same model on the same images in the same process; images/s of both and their ratio, the
             time to the first batch, the steady rate, the writers' MB/s, rows in the store, and how far the
             stored tokens are from the bare forward's.
  sae_speed  one training step of our TopKSAE/MultiSAETrainer against bench/sae.py's dense autograd TopK step at
             C = 8192 and 131072 (d = 1024, k = 32, 16,384 tokens, bf16 autocast on both): tokens/s and ratio.
  sae_train  MultiSAETrainer on CUDA with bf16 autocast: a few hundred steps of two SAEs, NMSE going down, and a
             checkpoint save/load round trip with a bit-identical resume (continue vs resume vs resume again),
             then the same under torch.use_deterministic_algorithms: if only that one is bitwise equal, the
             checkpoint is complete and the device's default kernels (atomics) are what differ; it passes then,
             with a note.

Every figure is printed beside the figure of the reference H200 run (H200_REFERENCE below, when it has one) with their ratio.

On the GPU machine lancedb is not installed (Ray and Lance come as packed wheels, lancedb does not).
The store's code uses lancedb only to list/create/open tables and to render filters (``lancedb.expr``); every
byte of tokens goes through pylance (fragment writers, commits, merge-inserts). So, where lancedb cannot be
imported, the extract part writes a small local-directory stand-in (:data:`LANCEDB_SHIM`: tables are
``<store>/<name>.lance`` Lance datasets, the layout lancedb uses) and puts it on PYTHONPATH for the driver and
the Ray workers; the summary says when it did. ``--lancedb-shim force`` uses it even where lancedb exists
(that is how the CPU dry run exercises it), ``off`` never.

    bash bench/gpu_check.sh               # on the GPU machine (after the wheel installs: see --plan)
    bash bench/gpu_check.sh --cpu-smoke   # the same code paths at tiny sizes on CPU (CI / dry run)
    python bench/gpu_check.py --plan      # the exact `device` tool calls a session makes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("extract", "sae_speed", "sae_train")

# ----------------------------------------------------------------------------------------- H200 reference
# The figures measured on the lent H200 (measured on the lent H200 by an earlier session); keys are used below.
H200_REFERENCE = {
    "bare_forward": (400.0, "DINOv3 ViT-L/16 @448 bare forward, batch 64-128: ~400 images/s"),
    "plain_pipeline": (95.0, ("plain Ray Data pipeline, no decode -> one GPU actor -> lance_ray.write_lance: "
                              "95 images/s end to end")),
    "plain_running": (267.0, "the same without the write, once running: 267 images/s"),
    "plain_ratio": (0.24, "plain pipeline with the write / bare forward: 0.24x"),
    "first_batch": (19.0, "plain pipeline: 19 s to the first batch (actor start, model build)"),
    "write_mb_s": (150.0, "one lance_ray.write_lance: about 150 MB/s"),
    "dense": ((3.5e6, 0.27e6), ("TopK SAE step, dense autograd, bf16 top-k, 16,384 tokens, k = 32: "
                                "3.5 M tokens/s @C=8192, 0.27 M @131072")),
    "sparsify": ((1.38e6, 0.36e6), "EleutherAI sparsify SparseCoder step: 1.38 M @8192, 0.36 M @131072"),
}


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU smoke run (same code paths, other sizes)."""

    device: str
    backbone: str
    weights: str | None
    image_size: int
    images: int  # records through the pipeline (and through the bare forward)
    unique_images: int  # distinct PNG files the records point at (decode cost is per record)
    batch: int
    rows_per_fragment: int | None  # None: the pipeline's own choice (~64 MB fragments)
    sae_d: int
    sae_k: int
    sae_tokens: int
    sae_Cs: tuple[int, ...]
    speed_warmup: int
    speed_steps: int
    train_saes: tuple[tuple[int, int], ...]  # (C, k) of the SAEs trained together
    train_batch: int
    train_steps: int  # steps before the checkpoint
    resume_steps: int  # steps after it (continue, resume, resume again)


GPU_SIZES = Sizes(device="cuda", backbone="dinov3-vitl16", weights="random", image_size=448, images=3072,
                  unique_images=64, batch=64, rows_per_fragment=None, sae_d=1024, sae_k=32, sae_tokens=16384, sae_Cs=(8192, 131072),
                  speed_warmup=3, speed_steps=15, train_saes=((8192, 32), (4096, 16)), train_batch=4096,
                  train_steps=200, resume_steps=100)
SMOKE_SIZES = Sizes(device="cpu", backbone="tiny-dinov3", weights=None, image_size=64, images=32, unique_images=4,
                    batch=8, rows_per_fragment=8, sae_d=64, sae_k=32, sae_tokens=512, sae_Cs=(256, 512),
                    speed_warmup=1, speed_steps=2, train_saes=((256, 8), (128, 4)), train_batch=256, train_steps=40,
                    resume_steps=5)
# per-part timeouts of gpu_check.sh (seconds): their sum plus the preflight stays under 8 minutes
TIMEOUTS = {"gpu": {"preflight": 45, "extract": 220, "sae_speed": 110, "sae_train": 90},
            "cpu-smoke": {"preflight": 120, "extract": 300, "sae_speed": 180, "sae_train": 180}}


def sizes_for(mode: str, overrides: dict[str, Any] | None = None) -> Sizes:
    base = GPU_SIZES if mode == "gpu" else SMOKE_SIZES
    return replace(base, **{k: v for k, v in (overrides or {}).items() if v is not None})


# ------------------------------------------------------------------------------------------ figures/results
def figure(name: str, value: float, unit: str = "", ref: str | None = None, index: int | None = None,
           baseline: float | None = None, baseline_label: str | None = None) -> dict[str, Any]:
    """One measured figure; ``ref`` names its reference figure (``index`` picks one of a per-C pair), or ``baseline``
    gives another figure of this run to compare against (e.g. ours against dense)."""
    out: dict[str, Any] = {"name": name, "value": float(value), "unit": unit, "gpu_md": None, "gpu_md_note": None,
                           "ratio": None}
    if ref is not None:
        ref_value, note = H200_REFERENCE[ref]
        ref_value = ref_value[index or 0] if isinstance(ref_value, tuple) else ref_value
        out.update(gpu_md=float(ref_value), gpu_md_note=note)
        out["ratio"] = float(value) / ref_value if ref_value else None
    elif baseline is not None:
        out.update(baseline=float(baseline), baseline_label=baseline_label)
        out["ratio"] = float(value) / baseline if baseline else None
    return out


class PartResult:
    """A part's figures, details and status, rewritten to ``<work>/<part>.json`` after every change."""

    def __init__(self, part: str, work: Path | None) -> None:
        self.path = work / f"{part}.json" if work is not None else None
        self.data: dict[str, Any] = {"part": part, "status": "running", "error": None, "figures": [], "details": {},
                                     "started": time.time(), "seconds": 0.0}

    def add(self, fig: dict[str, Any]) -> None:
        self.data["figures"].append(fig)
        self.flush()

    def detail(self, **kw: Any) -> None:
        self.data["details"].update(kw)
        self.flush()

    def flush(self) -> None:
        self.data["seconds"] = time.time() - self.data["started"]
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, default=str))
            tmp.replace(self.path)


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def cuda_peak_gb(device: str) -> float:
    if device != "cuda":
        return 0.0
    import torch

    return torch.cuda.max_memory_allocated() / 2**30


def reset_peak(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def require_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"CUDA is not available (torch {torch.__version__}): this part measures the GPU; use "
                           "--cpu-smoke on a machine without one")


# --------------------------------------------------------------------------------------------- lancedb shim
LANCEDB_SHIM = {
    "__init__.py": r'''
"""Stand-in for lancedb written by bench/gpu_check.py where lancedb is not installed (the lent GPU machine).

Local directories only. Tables are Lance datasets ``<uri>/<name>.lance`` (lancedb's own layout), created, listed
and opened here; reads, writes, merge-inserts and commits are pylance's own calls, as in spg_dist's store.
"""
import os
import shutil

import lance
import pyarrow as pa

__version__ = "0+gpu-check-shim"
SHIM = True


class _Unsupported(AttributeError, NotImplementedError):
    pass


class _Tables(list):
    @property
    def tables(self):
        return list(self)

    page_token = None


def _as_table(data, schema=None):
    if isinstance(data, pa.Table):
        return data if schema is None else data.cast(schema)
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    return pa.Table.from_pylist(list(data), schema=schema)


class Table:
    def __init__(self, db, name):
        self._db, self.name = db, name
        self._path = db._path(name)

    def __repr__(self):
        return f"ShimTable({self._path!r})"

    def to_lance(self):
        return lance.dataset(self._path, storage_options=self._db.storage_options)

    @property
    def schema(self):
        return self.to_lance().schema

    @property
    def version(self):
        return self.to_lance().version

    def count_rows(self, filter=None):
        return self.to_lance().count_rows(filter=filter)

    def to_arrow(self):
        return self.to_lance().to_table()

    def merge_insert(self, on):
        return self.to_lance().merge_insert(on)

    def add(self, data, mode="append"):
        lance.write_dataset(_as_table(data, self.schema), self._path, mode=mode,
                            storage_options=self._db.storage_options)

    def delete(self, where):
        self.to_lance().delete(where)

    def __getattr__(self, name):
        raise _Unsupported(f"lancedb shim of bench/gpu_check.py: Table.{name} is not provided (install lancedb)")


class DBConnection:
    def __init__(self, uri, storage_options=None):
        uri = os.fspath(uri)
        if "://" in uri and not uri.startswith("file://"):
            raise NotImplementedError("lancedb shim of bench/gpu_check.py: local directories only, not " + uri)
        self.uri = uri[len("file://"):] if uri.startswith("file://") else uri
        self.storage_options = storage_options

    def _path(self, name):
        return os.path.join(self.uri, f"{name}.lance")

    def _exists(self, name):
        return os.path.isdir(os.path.join(self._path(name), "_versions"))

    def list_tables(self, *args, **kwargs):
        if not os.path.isdir(self.uri):
            return _Tables()
        return _Tables(sorted(n[:-len(".lance")] for n in os.listdir(self.uri)
                              if n.endswith(".lance") and self._exists(n[:-len(".lance")])))

    def table_names(self, *args, **kwargs):
        return list(self.list_tables())

    def open_table(self, name, **kwargs):
        if not self._exists(name):
            raise ValueError(f"Table '{name}' was not found")
        return Table(self, name)

    def create_table(self, name, data=None, schema=None, mode="create", exist_ok=False, **kwargs):
        if self._exists(name):
            if mode == "overwrite":
                self.drop_table(name)
            elif exist_ok:
                return self.open_table(name)
            else:
                raise ValueError(f"Table '{name}' already exists")
        table = schema.empty_table() if data is None else _as_table(data, schema)
        try:
            lance.write_dataset(table, self._path(name), schema=schema or table.schema, mode="create",
                                storage_options=self.storage_options)
        except Exception:
            if exist_ok and self._exists(name):  # another process created it meanwhile
                return self.open_table(name)
            raise
        return Table(self, name)

    def drop_table(self, name, **kwargs):
        shutil.rmtree(self._path(name), ignore_errors=True)


def connect(uri, *args, storage_options=None, **kwargs):
    return DBConnection(uri, storage_options)
''',
    "expr.py": r'''
"""``lancedb.expr`` of the shim: the same builder (col, lit, ==, isin, &, |, ~), rendered to SQL in Python."""
import datetime as _dt
import re

__all__ = ["Expr", "col", "lit"]
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Expr:
    __hash__ = None

    def __init__(self, sql):
        self._sql = sql

    def to_sql(self):
        return self._sql

    def __repr__(self):
        return f"Expr({self._sql})"

    def _bin(self, op, other):
        return Expr(f"({self._sql} {op} {_coerce(other)._sql})")

    def __eq__(self, other):
        return self._bin("=", other)

    def __ne__(self, other):
        return self._bin("<>", other)

    def __lt__(self, other):
        return self._bin("<", other)

    def __le__(self, other):
        return self._bin("<=", other)

    def __gt__(self, other):
        return self._bin(">", other)

    def __ge__(self, other):
        return self._bin(">=", other)

    def __and__(self, other):
        return self._bin("AND", other)

    def __rand__(self, other):
        return _coerce(other)._bin("AND", self)

    def __or__(self, other):
        return self._bin("OR", other)

    def __ror__(self, other):
        return _coerce(other)._bin("OR", self)

    def __invert__(self):
        return Expr(f"(NOT {self._sql})")

    def isin(self, values):
        return Expr(f"{self._sql} IN ({', '.join(_coerce(v)._sql for v in values)})")


def _coerce(value):
    return value if isinstance(value, Expr) else lit(value)


def col(name):
    if _IDENT.fullmatch(name):
        return Expr(name)
    return Expr("`" + name.replace("`", "``") + "`")


def lit(value):
    if value is None:
        return Expr("NULL")
    if isinstance(value, bool):
        return Expr("true" if value else "false")
    if isinstance(value, int):
        return Expr(str(value))
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"lancedb shim: cannot render the float {value!r} as SQL")
        return Expr(repr(value))
    if isinstance(value, str):
        return Expr("'" + value.replace("'", "''") + "'")
    if isinstance(value, _dt.datetime):
        return Expr(f"CAST('{value.isoformat(sep=' ')}' AS TIMESTAMP)")
    if isinstance(value, _dt.date):
        return Expr(f"CAST('{value.isoformat()}' AS DATE)")
    raise TypeError(f"lancedb shim: no SQL literal for {type(value).__name__}")
''',
    "index.py": r'''
"""Index configs of the shim: importable (spg_dist.store imports them), not usable."""


class _Index:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class BTree(_Index):
    pass


class Bitmap(_Index):
    pass


class LabelList(_Index):
    pass


class FTS(_Index):
    pass


class IvfFlat(_Index):
    pass


class IvfPq(_Index):
    pass


class HnswSq(_Index):
    pass
''',
}


def write_lancedb_shim(dest: Path) -> Path:
    """Write the shim package under ``dest/lancedb``; returns ``dest`` (the folder to put on the path)."""
    pkg = dest / "lancedb"
    pkg.mkdir(parents=True, exist_ok=True)
    for name, text in LANCEDB_SHIM.items():
        (pkg / name).write_text(text.lstrip("\n"))
    return dest


def have_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def use_lancedb_shim(mode: str, work: Path) -> bool:
    """Put the shim first on sys.path and PYTHONPATH (so Ray workers started afterwards see it too) when
    ``mode`` is "force", or "auto" and lancedb is not importable. Returns whether the shim is in use."""
    if mode == "off" or (mode == "auto" and have_module("lancedb")):
        return False
    if "lancedb" in sys.modules and not getattr(sys.modules["lancedb"], "SHIM", False):
        raise RuntimeError("the real lancedb is already imported in this process; the shim cannot replace it")
    shim = str(write_lancedb_shim(work / "lancedb_shim"))
    sys.path.insert(0, shim)
    os.environ["PYTHONPATH"] = shim + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    import lancedb  # noqa: F401  (the shim, from here on)

    assert getattr(sys.modules["lancedb"], "SHIM", False), sys.modules["lancedb"].__file__
    return True


# -------------------------------------------------------------------------------------------------- extract
def make_images(folder: Path, count: int, size: int, seed: int = 0) -> list[str]:
    """``count`` distinct smooth RGB PNGs of ``size`` px (random low-frequency colour fields plus a little noise):
    synthetic, since nothing can be downloaded on the GPU machine."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
        path = folder / f"img_{i:04d}.png"
        Image.fromarray(img).save(path)
        paths.append(str(path))
    return paths


def part_extract(sz: Sizes, res: PartResult, work: Path, lancedb_shim: str = "auto",
                 num_cpus: int | None = None) -> None:
    shim = use_lancedb_shim(lancedb_shim, work)
    res.detail(lancedb_shim=shim, lancedb_note=("lancedb stand-in in use (lancedb not installed, or --lancedb-shim "
                                                "force): tables listed/created/opened by bench/gpu_check.py's shim, "
                                                "all data through pylance") if shim else None)
    import numpy as np
    import torch

    require_device(sz.device)
    from spg_dist.backbones import create_backbone, get_config
    from spg_dist.data.imageio import load_image
    from spg_dist.data.records import ImageRecord

    cfg = get_config(sz.backbone)
    files = make_images(work / "images", sz.unique_images, sz.image_size)
    records = [ImageRecord(image_id=f"gpucheck/{i:06d}", dataset="gpucheck", category=f"c{i % 4}", split="train",
                           label=0, defect_type="good", image_uri=files[i % len(files)]) for i in range(sz.images)]
    res.detail(backbone=sz.backbone, weights=sz.weights, image_size=sz.image_size, images=sz.images,
               unique_files=len(files), batch=sz.batch, device=sz.device, grid=list(cfg.grid), dim=cfg.dim)

    # ---- the bare forward: the same images (decoded once), the same backbone, this process
    t0 = time.perf_counter()
    unique = np.stack([load_image(f, sz.image_size, cfg.preprocess.resample) for f in files])
    pixels = unique[np.arange(sz.images) % len(files)]
    decode_s = time.perf_counter() - t0
    reset_peak(sz.device)
    t0 = time.perf_counter()
    model = create_backbone(sz.backbone, weights=sz.weights, device=sz.device, image_size=sz.image_size)
    build_s = time.perf_counter() - t0
    batches = [torch.from_numpy(pixels[i:i + sz.batch]) for i in range(0, sz.images, sz.batch)]

    def batch_in(b: torch.Tensor) -> torch.Tensor:
        return b.pin_memory() if sz.device == "cuda" else b

    for b in batches[:2]:  # warm-up (kernel selection, allocator)
        model.encode(batch_in(b))
    sync(sz.device)
    t0 = time.perf_counter()
    for b in batches:
        out = model.encode(batch_in(b))
    sync(sz.device)
    bare_s = time.perf_counter() - t0
    first_tokens = None
    t0 = time.perf_counter()
    for j, b in enumerate(batches):  # what an actor does per batch: forward, fp16, to the host
        host = {layer: t.to(torch.float16).cpu().numpy() for layer, t in model.encode(batch_in(b)).items()}
        if j == 0:
            first_tokens = next(iter(host.values()))[0].astype(np.float32)
    bare_d2h_s = time.perf_counter() - t0
    del out, host
    bare = sz.images / bare_s
    res.add(figure("bare forward, Backbone.encode (images/s)", bare, "images/s", ref="bare_forward"))
    res.add(figure("bare forward + fp16 copy to host (images/s)", sz.images / bare_d2h_s, "images/s",
                   ref="bare_forward"))
    res.detail(model_build_s=build_s, decode_unique_s=decode_s, bare_peak_gb=cuda_peak_gb(sz.device),
               bare_tokens_per_s=bare * cfg.grid[0] * cfg.grid[1])
    del model
    import gc

    gc.collect()
    if sz.device == "cuda":
        torch.cuda.empty_cache()

    # ---- the pipeline: Ray Data decode -> actor pool -> fragment writers -> commits, into a store
    import ray

    import spg_dist.ray.extract as extract_mod
    from spg_dist.ray.runtime import ensure_ray
    from spg_dist.store import Store, tokens

    started_ray = not ray.is_initialized()
    t0 = time.perf_counter()
    ensure_ray(None, num_cpus or os.cpu_count() or 2)
    if started_ray and sz.device == "cuda" and ray.cluster_resources().get("GPU", 0) < 1:
        # Ray found no GPU by itself (no NVML in the image?): say how many there are, else the GPU actor never starts
        ray.shutdown()
        import logging

        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 2, num_gpus=torch.cuda.device_count(),
                 include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = False
        res.detail(ray_gpus_given_explicitly=True)
    if sz.device == "cuda" and ray.cluster_resources().get("GPU", 0) < 1:
        raise RuntimeError(f"the Ray cluster has no GPU ({ray.cluster_resources()}): the GPU actor would never start")
    res.detail(ray_init_s=time.perf_counter() - t0, ray_version=ray.__version__,
               cluster_resources={k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")})
    if shim:  # the workers must import the shim too (they inherit PYTHONPATH from this process)
        def lancedb_origin() -> str:  # nested: cloudpickle ships it by value (this file is no importable module)
            import lancedb

            return f"{lancedb.__file__} (shim: {getattr(lancedb, 'SHIM', False)})"

        res.detail(worker_lancedb=ray.get(ray.remote(num_cpus=0)(lancedb_origin).remote()))
        if "lancedb_shim" not in res.data["details"]["worker_lancedb"]:
            raise RuntimeError(f"Ray workers import another lancedb: {res.data['details']['worker_lancedb']}")
    arrivals: list[tuple[float, int]] = []
    original = extract_mod._collect

    def collect(batch, *args, **kwargs):  # timestamps of what reaches the driver
        arrivals.append((time.perf_counter(), batch.num_rows))
        return original(batch, *args, **kwargs)

    store_path = work / "store"
    shutil.rmtree(store_path, ignore_errors=True)
    extract_mod._collect = collect
    t_start = time.perf_counter()
    try:
        result = extract_mod.extract(
            str(store_path), f"folder:{work / 'images'}", sz.backbone, weights=sz.weights, image_size=sz.image_size,
            batch_size=sz.batch, num_actors=1, gpus_per_actor=1.0 if sz.device == "cuda" else 0.0,
            cpus_per_actor=1.0, rows_per_fragment=sz.rows_per_fragment, progress=False, records=records)
    finally:
        extract_mod._collect = original
        if started_ray:
            ray.shutdown()
    total_s = time.perf_counter() - t_start
    pipe = sz.images / result.seconds
    res.detail(pipeline_summary=result.summary(), pipeline_errors=len(result.errors),
               rows_written=result.rows_written, token_bytes=result.token_bytes)
    res.add(figure("pipeline end to end into the store (images/s)", pipe, "images/s", ref="plain_pipeline"))
    res.add(figure("pipeline / bare forward", pipe / bare, "x", ref="plain_ratio"))
    if arrivals:
        first = arrivals[0][0] - t_start
        res.add(figure("time to the first batch at the driver (s)", first, "s", ref="first_batch"))
        if len(arrivals) > 2:
            done_after_first = sum(n for _, n in arrivals[1:])
            steady = done_after_first / max(arrivals[-1][0] - arrivals[0][0], 1e-9)
            # rows are (image, layer) pairs: one layer here, so rows/s = images/s
            res.add(figure("pipeline once running (images/s)", steady, "images/s", ref="plain_running"))
            res.add(figure("pipeline once running / bare forward", steady / bare, "x", baseline=1.0,
                           baseline_label="bare forward"))
    if result.write_seconds > 0:
        res.add(figure("fragment writer throughput (MB/s per writer)", result.token_bytes / result.write_seconds / 1e6,
                       "MB/s", ref="write_mb_s"))
    res.detail(extract_wall_s=total_s)

    # ---- what is in the store: every row, and the tokens the bare forward gave
    store = Store(str(store_path))
    stored = store.count(tokens.TABLE)
    res.add(figure("patch_tokens rows in the store / images", stored / sz.images, "x", baseline=1.0,
                   baseline_label="one row per image"))
    _, got = tokens.load_tokens(store, result.backbone_id, result.layers[-1], image_ids=[records[0].image_id])
    diff = float(np.abs(got[0].astype(np.float32) - first_tokens).max())
    scale = float(np.abs(first_tokens).max()) or 1.0
    res.add(figure("stored tokens vs bare forward (max abs diff / max abs)", diff / scale, "", baseline=0.05,
                   baseline_label="tolerance (bf16)"))
    problems = []
    if result.rows_written != sz.images or stored != sz.images:
        problems.append(f"{stored} rows stored, {result.rows_written} written, {sz.images} images")
    if result.errors:
        problems.append(f"{len(result.errors)} error rows: {result.errors[0].get('reason')}")
    if diff / scale > 0.05:
        problems.append(f"stored tokens differ from the bare forward by {diff / scale:.3g} (relative)")
    if problems:
        raise AssertionError("; ".join(problems))


# ------------------------------------------------------------------------------------------------ SAE steps
def synthetic_tokens(n: int, d: int, device: str, seed: int, true_atoms: int = 4096, active: int = 32):
    """Tokens made of a few of many directions plus noise and an offset (as bench/sae.py's), drawn on ``device``."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device=device).manual_seed(seed)
    atoms = F.normalize(torch.randn(true_atoms, d, generator=g, device=device), dim=1)
    idx = torch.randint(0, true_atoms, (n, active), generator=g, device=device)
    coef = torch.rand(n, active, generator=g, device=device) * 2 + 0.2
    x = F.embedding_bag(idx, atoms, per_sample_weights=coef, mode="sum")
    return (x + 0.05 * torch.randn(n, d, generator=g, device=device) + 0.3).contiguous()


def dense_baseline_class():
    """bench/sae.py's DenseTopK (the baseline every SAE figure is compared with), loaded from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("spg_bench_sae", ROOT / "bench" / "sae.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.DenseTopK


def median_step_seconds(step: Callable[[Any], None], batches: list, warmup: int, steps: int, device: str) -> float:
    for s in range(warmup):
        step(batches[s % len(batches)])
    times = []
    for s in range(steps):
        xb = batches[s % len(batches)]
        sync(device)
        t0 = time.perf_counter()
        step(xb)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def part_sae_speed(sz: Sizes, res: PartResult, work: Path) -> None:
    import torch
    import torch.nn.functional as F

    require_device(sz.device)
    from spg_dist.sae import DeadLatentTracker, MultiSAETrainer, SAEConfig, TrainConfig
    from spg_dist.sae.preprocess import Preprocessing

    DenseTopK = dense_baseline_class()
    dev, d, k, n = sz.device, sz.sae_d, sz.sae_k, sz.sae_tokens
    batches = [synthetic_tokens(n, d, dev, seed) for seed in (1, 2)]
    autocast = dict(device_type=dev, dtype=torch.bfloat16, enabled=dev == "cuda")
    res.detail(d=d, k=k, tokens=n, Cs=list(sz.sae_Cs), device=dev, warmup=sz.speed_warmup, steps=sz.speed_steps,
               bf16_autocast=dev == "cuda")
    for ci, C in enumerate(sz.sae_Cs):
        figs: dict[str, float] = {}
        for kind in ("dense", "ours", "ours_auxk"):
            reset_peak(dev)
            if kind == "dense":  # bench/sae.py's baseline step, under bf16 autocast (its top-k runs in bf16)
                m = DenseTopK(d, C, k).to(dev)
                with torch.no_grad():
                    m.b_pre.copy_(batches[0].mean(0))
                opt = torch.optim.Adam(m.parameters(), lr=1e-3)
                tracker = DeadLatentTracker(C, 10_000_000, device=dev)

                def step(xb, m=m, opt=opt, tracker=tracker):
                    with torch.autocast(**autocast):
                        x_hat, i, v = m(xb)
                        loss = (xb - x_hat).pow(2).sum(-1).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        m.W_dec.data = F.normalize(m.W_dec.data, dim=1)
                    tracker.update(i, v, xb.shape[0])
            else:  # ours: TopKSAE through MultiSAETrainer.step (bf16 autocast is the trainer's default on CUDA)
                auxk = kind == "ours_auxk"
                cfg = SAEConfig(d=d, C=C, k=k, auxk=auxk, dead_tokens=n if auxk else 10_000_000)
                tr = MultiSAETrainer([cfg], TrainConfig(lr=1e-3, batch_tokens=n), Preprocessing(), device=dev)
                tr.init_from_sample(batches[0])

                def step(xb, tr=tr):
                    tr.step(xb)
            sec = median_step_seconds(step, batches, sz.speed_warmup, sz.speed_steps, dev)
            figs[kind] = n / sec
            res.detail(**{f"peak_gb_{kind}_C{C}": cuda_peak_gb(dev)})
            if kind == "ours_auxk":
                res.detail(**{f"dead_fraction_ours_auxk_C{C}": tr.trackers[0].dead_fraction(n)})
            del step
            if kind == "dense":
                del m, opt, tracker
            else:
                del tr
        res.add(figure(f"dense TopK step C={C} (tokens/s)", figs["dense"], "tokens/s", ref="dense", index=ci))
        res.add(figure(f"ours (MultiSAETrainer) C={C} (tokens/s)", figs["ours"], "tokens/s", ref="dense", index=ci))
        res.add(figure(f"ours / dense C={C}", figs["ours"] / figs["dense"], "x", baseline=1.0,
                       baseline_label="dense, this run"))
        res.add(figure(f"ours vs the reference sparsify figure C={C} (tokens/s)", figs["ours"], "tokens/s",
                       ref="sparsify", index=ci))
        res.add(figure(f"ours + AuxK (dead after one batch) C={C} (tokens/s)", figs["ours_auxk"], "tokens/s",
                       baseline=figs["dense"], baseline_label="dense, this run"))


# ------------------------------------------------------------------------------------------- SAE training
def state_tensors(trainer) -> dict[str, Any]:
    return {k: v.detach().to("cpu").clone() for k, v in trainer.state_dict()["tensors"].items()}


def compare_states(a: dict[str, Any], b: dict[str, Any]) -> tuple[bool, float, list[str]]:
    """(bit-identical, max abs difference over float tensors, names that differ)."""
    import torch

    differ, worst = [], 0.0
    for name in sorted(set(a) | set(b)):
        x, y = a.get(name), b.get(name)
        if x is None or y is None or x.shape != y.shape or x.dtype != y.dtype:
            differ.append(name)
            worst = math.inf
            continue
        xb, yb = x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8)
        if not torch.equal(xb, yb):
            differ.append(name)
            if x.is_floating_point():
                worst = max(worst, float((x.double() - y.double()).abs().max()))
            else:
                worst = max(worst, float((x.long() - y.long()).abs().max()) if x.dtype != torch.bool else 1.0)
    return not differ, worst, differ


def part_sae_train(sz: Sizes, res: PartResult, work: Path) -> None:
    if sz.device == "cuda":  # lets the deterministic repeat below use cuBLAS deterministically (before any handle)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    require_device(sz.device)
    from spg_dist.sae import MultiSAETrainer, SAEConfig, TrainConfig, load_checkpoint, save_checkpoint

    dev, d, B = sz.device, sz.sae_d, sz.train_batch
    C0, k0 = sz.train_saes[0]  # tokens an SAE of that size can learn: 2*C0 directions, k0 of them per token
    pool = [synthetic_tokens(B, d, dev, seed=100 + i, true_atoms=2 * C0, active=k0) for i in range(8)]
    held_out = synthetic_tokens(B, d, dev, seed=99, true_atoms=2 * C0, active=k0)
    configs = [SAEConfig(d=d, C=C, k=k, dead_tokens=4 * B) for C, k in sz.train_saes]  # AuxK kicks in early
    train = TrainConfig(lr=1e-3, batch_tokens=B, autocast_bf16=True, seed=0)
    res.detail(saes=[c.name for c in configs], d=d, batch=B, steps=sz.train_steps, resume_steps=sz.resume_steps,
               device=dev, bf16_autocast=dev == "cuda", torch=torch.__version__)

    def eval_nmse(tr) -> list[float]:
        out = []
        with torch.no_grad(), tr._autocast():
            for sae in tr.saes:
                o = sae(held_out)
                out.append(float(o.fvu))
        return out

    def run(tr, start: int, steps: int) -> list[list[dict]]:
        return [tr.step(pool[(start + s) % len(pool)]) for s in range(steps)]

    def experiment(tag: str) -> dict[str, Any]:
        ck = work / f"ckpt_{tag}"
        shutil.rmtree(ck, ignore_errors=True)
        a = MultiSAETrainer(configs, train, device=dev)
        a.init_from_sample(pool[0])
        before = eval_nmse(a)
        sync(dev)
        t0 = time.perf_counter()
        hist = run(a, 0, sz.train_steps)
        sync(dev)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        save_checkpoint(a, ck)
        save_s = time.perf_counter() - t0
        saved = state_tensors(a)
        hist += run(a, sz.train_steps, sz.resume_steps)
        after = eval_nmse(a)
        continued = state_tensors(a)
        t0 = time.perf_counter()
        b = load_checkpoint(ck, device=dev)
        load_s = time.perf_counter() - t0
        roundtrip_ok, roundtrip_diff, roundtrip_names = compare_states(saved, state_tensors(b))
        run(b, sz.train_steps, sz.resume_steps)
        resumed = state_tensors(b)
        c = load_checkpoint(ck, device=dev)
        run(c, sz.train_steps, sz.resume_steps)
        again = state_tensors(c)
        same, diff, names = compare_states(continued, resumed)
        repeat, repeat_diff, _ = compare_states(resumed, again)
        return dict(before=before, after=after, hist=hist, train_s=train_s, save_s=save_s, load_s=load_s,
                    roundtrip=roundtrip_ok, roundtrip_diff=roundtrip_diff, roundtrip_names=roundtrip_names[:8],
                    same=same, diff=diff, names=names[:8], repeat=repeat, repeat_diff=repeat_diff)

    r = experiment("default")
    n_sae = len(configs)
    first = [r["hist"][0][i]["nmse"] for i in range(n_sae)]
    last = [statistics.mean(h[i]["nmse"] for h in r["hist"][-10:]) for i in range(n_sae)]
    tokens_per_s = sz.train_steps * B / r["train_s"]
    res.add(figure(f"trainer step, {n_sae} SAEs on one batch (tokens/s)", tokens_per_s, "tokens/s", ref="dense",
                   index=0))
    for i, cfg in enumerate(configs):
        res.add(figure(f"{cfg.name}: training NMSE, last 10 steps / first step", last[i] / first[i], "x",
                       baseline=1.0, baseline_label="no progress"))
        res.add(figure(f"{cfg.name}: held-out NMSE after / before training", r["after"][i] / r["before"][i], "x",
                       baseline=1.0, baseline_label="no progress"))
    res.add(figure("checkpoint save (s)", r["save_s"], "s"))
    res.add(figure("checkpoint load (s)", r["load_s"], "s"))
    res.add(figure("resume vs continue: max abs difference", r["diff"], ""))
    res.add(figure("resume bit-identical to continuing (1 = yes)", float(r["same"]), "", baseline=1.0,
                   baseline_label="required"))
    res.detail(nmse_first=first, nmse_last10=last, heldout_before=r["before"], heldout_after=r["after"],
               roundtrip_exact=r["roundtrip"], roundtrip_diff=r["roundtrip_diff"],
               roundtrip_differing=r["roundtrip_names"], resume_bit_identical=r["same"],
               resume_differing=r["names"], resume_repeatable=r["repeat"], resume_repeat_diff=r["repeat_diff"],
               dead_fraction_last=[r["hist"][-1][i]["dead_fraction"] for i in range(n_sae)])
    # the same again under torch.use_deterministic_algorithms: tells a checkpoint that misses state apart from a
    # device whose kernels (atomics in index_add_, ...) are not bitwise repeatable
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        det = experiment("deterministic")
    finally:
        torch.use_deterministic_algorithms(False)
    res.add(figure("resume bit-identical under use_deterministic_algorithms (1 = yes)", float(det["same"]), "",
                   baseline=1.0, baseline_label="required"))
    res.detail(deterministic_resume_bit_identical=det["same"], deterministic_diff=det["diff"],
               deterministic_repeatable=det["repeat"], deterministic_roundtrip_exact=det["roundtrip"],
               deterministic_differing=det["names"])
    problems = []
    if not (r["roundtrip"] and det["roundtrip"]):
        problems.append(f"checkpoint round trip not exact (differs: {r['roundtrip_names'] or det['roundtrip_names']})")
    if not all(lo < hi for lo, hi in zip(last, first)):
        problems.append(f"training NMSE did not go down: first {first}, last 10 steps {last}")
    if not all(a < b for a, b in zip(r["after"], r["before"])):
        problems.append(f"held-out NMSE did not go down: before {r['before']}, after {r['after']}")
    if not r["same"]:
        if det["same"] and not r["repeat"]:
            res.detail(resume_note="not bit-identical by default because the device is not bitwise repeatable "
                                   f"(two resumes from one checkpoint agree: {r['repeat']}); bit-identical under "
                                   "torch.use_deterministic_algorithms(True), so the checkpoint holds the whole state")
        else:
            problems.append(f"resume differs from continuing (max abs diff {r['diff']:.3g}, in {r['names']}; "
                            f"two resumes agree with each other: {r['repeat']})")
    if problems:
        raise AssertionError("; ".join(problems))


PART_FUNCS: dict[str, Callable[..., None]] = {"extract": part_extract, "sae_speed": part_sae_speed,
                                               "sae_train": part_sae_train}


def run_part(part: str, sz: Sizes, work: Path, fail: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Run one part in this process; returns (and writes to ``<work>/<part>.json``) its result dict."""
    work.mkdir(parents=True, exist_ok=True)
    res = PartResult(part, work)
    res.detail(sizes={k: v for k, v in asdict(sz).items()})
    res.flush()
    try:
        if fail:
            raise RuntimeError(f"--fail-part {part}: failure injected on purpose (tests of the orchestration)")
        PART_FUNCS[part](sz, res, work, **kwargs)
        res.data["status"] = "ok"
    except BaseException as err:  # SystemExit from the SIGTERM handler too: keep what was measured
        res.data["status"] = "timeout" if isinstance(err, SystemExit) else "fail"
        res.data["error"] = ("stopped by its time limit (SIGTERM); the figures measured so far are kept"
                             if isinstance(err, SystemExit) else f"{type(err).__name__}: {err}")
        res.data["traceback"] = traceback.format_exc()[-4000:]
        log(f"{part}: {res.data['error']}")
        if not isinstance(err, Exception):
            res.flush()
            raise
    res.flush()
    return res.data


# ---------------------------------------------------------------------------------------------- preflight
def preflight() -> dict[str, Any]:
    """What is importable and which versions: the first thing the shell script prints."""
    info: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable,
                            "machine": platform.machine(), "cpus": os.cpu_count(),
                            "tmp_site": os.path.isdir("/tmp/site"),
                            "pythonpath": os.environ.get("PYTHONPATH", "")}
    modules = {}
    for name in ("torch", "transformers", "numpy", "pyarrow", "PIL", "safetensors", "tqdm", "scipy", "ray",
                 "lance", "lance_ray", "lancedb", "spg_dist"):
        try:
            mod = __import__(name)
            modules[name] = str(getattr(mod, "__version__", "ok"))
        except Exception as err:  # noqa: BLE001 - a broken install is what this reports
            modules[name] = None
            info.setdefault("import_errors", {})[name] = f"{type(err).__name__}: {str(err)[:200]}"
    info["modules"] = modules
    if modules.get("torch"):
        import torch

        info["cuda"] = torch.cuda.is_available()
        info["torch_cuda"] = torch.version.cuda
        if info["cuda"]:
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = props.name
            info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
            info["bf16"] = torch.cuda.is_bf16_supported()
    if modules.get("transformers"):
        import transformers

        info["dinov3_in_transformers"] = hasattr(transformers, "DINOv3ViTModel")
    try:  # the backbone path end to end at toy size: catches a transformers/torch mismatch in seconds
        if modules.get("spg_dist") and modules.get("torch") and modules.get("transformers"):
            import torch

            from spg_dist.backbones import create_backbone

            dev = "cuda" if info.get("cuda") else "cpu"
            grid = create_backbone("tiny-dinov3", device=dev, image_size=64).encode(
                torch.zeros(2, 64, 64, 3, dtype=torch.uint8))
            info["tiny_dinov3_encode"] = f"ok on {dev}: " + str({k: list(v.shape) for k, v in grid.items()})
    except Exception as err:  # noqa: BLE001
        info["tiny_dinov3_encode"] = f"FAILED: {type(err).__name__}: {str(err)[:300]}"
    try:
        shm = shutil.disk_usage("/dev/shm")
        info["dev_shm_gb"] = round(shm.free / 2**30, 1)  # Ray's object store lives here (else in /tmp, slower)
    except OSError:
        info["dev_shm_gb"] = None
    info["extract_ready"] = bool(modules.get("ray") and modules.get("lance") and modules.get("spg_dist"))
    info["lancedb_shim_needed"] = modules.get("lancedb") is None
    return info


# ---------------------------------------------------------------------------------------------- summary
def _fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if not math.isfinite(v):
        return str(v)
    if unit == "tokens/s" or abs(v) >= 1e5:
        return f"{v / 1e6:.3f} M"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.4g}"


def summarize(results: dict[str, dict[str, Any]], mode: str, pre: dict[str, Any] | None,
              parts: tuple[str, ...] = PARTS) -> tuple[dict[str, Any], str]:
    """The summary (JSON-able) and its text table; a part without a result counts as failed."""
    out_parts = {}
    for part in parts:
        r = results.get(part) or {"part": part, "status": "fail", "figures": [], "details": {},
                                  "error": "no result (the part crashed or was killed before writing one)"}
        out_parts[part] = r
    ok = all(r["status"] == "ok" for r in out_parts.values())
    summary = {"mode": mode, "ok": ok, "preflight": pre or {}, "parts": out_parts, "gpu_md": "bench/gpu_check.py H200_REFERENCE",
               "note": ("cpu-smoke: tiny sizes on CPU; the reference columns and ratios only show the plumbing works"
                        if mode != "gpu" else "")}
    pre = pre or {}
    mods = pre.get("modules", {})
    lines = [f"GPU check ({mode}): {'ALL PARTS OK' if ok else 'SOME PARTS FAILED'}",
             (f"  python {pre.get('python')}, torch {mods.get('torch')} (CUDA {pre.get('torch_cuda')}), GPU "
              f"{pre.get('gpu', 'none')}, transformers {mods.get('transformers')}, ray {mods.get('ray')}, lance "
              f"{mods.get('lance')}, lancedb {mods.get('lancedb') or 'missing'}")]
    if summary["note"]:
        lines.append("  " + summary["note"])
    width = 66
    lines.append(f"  {'figure':{width}s} {'measured':>12s} {'ref/base':>12s} {'ratio':>8s}")
    for part, r in out_parts.items():
        extra = f" ({r.get('seconds', 0):.0f} s)" if r.get("seconds") else ""
        lines.append(f"[{part}] {r['status'].upper()}{extra}" + (f": {r['error']}" if r.get("error") else ""))
        for f in r["figures"]:
            ref = f.get("gpu_md") if f.get("gpu_md") is not None else f.get("baseline")
            lines.append(f"  {f['name'][:width]:{width}s} {_fmt(f['value'], f['unit']):>12s} "
                         f"{_fmt(ref, f['unit']):>12s} {_fmt(f.get('ratio')):>8s}")
        det = r.get("details", {})
        if det.get("lancedb_shim"):
            lines.append(f"  note: {det.get('lancedb_note')}")
        if det.get("resume_note"):
            lines.append(f"  note: {det['resume_note']}")
    return summary, "\n".join(lines)


# -------------------------------------------------------------------------------------------------- plan
INSTALL_A = "bash .gpu/a/install.sh"
INSTALL_B = "bash .gpu/b/install.sh"
CHECK = "bash bench/gpu_check.sh"


def _du(path: Path) -> int | None:
    if not path.exists():
        return None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _tree_bytes() -> int | None:
    """Bytes of what a device call sends besides carried paths: tracked and untracked-not-ignored files."""
    try:
        names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                               capture_output=True).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        return None
    total = 0
    for n in names:
        p = ROOT / n.decode(errors="replace")
        if n and p.is_file():
            total += p.stat().st_size
    return total


def _mib(v: int | None) -> str:
    return "missing" if v is None else f"{v / 2**20:.0f} MiB"


def plan() -> str:
    t = TIMEOUTS["gpu"]
    check_s = sum(t.values()) + 15
    a, b, tree = _du(ROOT / ".gpu" / "a"), _du(ROOT / ".gpu" / "b"), _tree_bytes()
    calls = [
        {"carry": [".gpu/a"], "timeout_s": 300, "command": INSTALL_A},
        {"carry": [".gpu/b"], "timeout_s": 570, "command": f"{INSTALL_B}; {CHECK}"},
    ]
    out = [
        "# bench/gpu_check.sh on the lent H200: the device calls, in order (15 min of device time per session).",
        "#",
        "# 0. Here, once, no device time (a few minutes): pack Ray + pylance + lance-ray for the GPU machine",
        "#      ../shared/tools/pack-gpu-wheels          # -> .gpu/a (Ray), .gpu/b (Lance); .gpu/ is git-ignored",
        (f"#    now: .gpu/a {_mib(a)}, .gpu/b {_mib(b)}; working tree that travels with every call: {_mib(tree)}"
         " (each call: tree + carry <= 64 MiB)"),
        "#    lancedb is not packed: the check's extract part uses its own small stand-in over pylance there.",
        "# 1. and 2. back to back (/tmp/site survives only while the machine stays warm, 30 s after a call).",
        "#    Call 2 installs the Lance wheels, then runs the check whatever the install did (the SAE parts need",
        ("#    neither Ray nor Lance). The check's parts have their own timeouts "
         f"(preflight {t['preflight']} s, extract {t['extract']} s, sae_speed {t['sae_speed']} s, "
         f"sae_train {t['sae_train']} s: <= {check_s} s)."),
    ]
    for i, c in enumerate(calls, 1):
        out.append(f"run {json.dumps(c)}")
    out += [
        "give_back {}",
        "#",
        "# Budget: machine start ~1-2 min + call 1 ~1 min + call 2 <= 9.5 min (typically ~4) = within 15 min.",
        "# Results: $OUT of call 2 comes back under files_at: summary.txt, summary.json, preflight.json and one log",
        "# per part (extract.log, sae_speed.log, sae_train.log); output_tail ends with the summary table.",
        "# Rerun one failed part only while the machine is still warm (and >= 4 min are left), instead of give_back:",
        f"run {json.dumps({'timeout_s': 300, 'command': CHECK + ' --parts sae_train'})}",
        "# (the extract part needs /tmp/site from calls 1-2; after the machine went back, both installs again.)",
    ]
    return "\n".join(out)


# -------------------------------------------------------------------------------------------------- main
def _sigterm(signum, frame):  # `timeout` sends SIGTERM: unwind, so finally blocks (ray.shutdown, JSON) run
    raise SystemExit(128 + signum)


def _part_kwargs(part: str, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    if part != "extract":
        return {}
    # the CPU dry run starts a 2-CPU local Ray (this machine's size); the GPU run takes the whole machine
    return {"lancedb_shim": args.lancedb_shim, "num_cpus": 2 if mode == "cpu-smoke" else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", action="store_true", help="print the device tool calls and exit")
    ap.add_argument("--preflight", action="store_true", help="report what is importable (JSON into --work)")
    ap.add_argument("--part", choices=PARTS, help="run one part in this process")
    ap.add_argument("--summarize", action="store_true", help="merge the parts' results into --out")
    ap.add_argument("--all", action="store_true", help="preflight, every part and the summary in this process "
                                                      "(no per-part timeouts; gpu_check.sh is the way on the GPU)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU (tiny-dinov3 @64 px, C = 256)")
    ap.add_argument("--parts", default=",".join(PARTS), help="parts for --summarize/--all (comma-separated)")
    ap.add_argument("--work", default=None, help="scratch folder (images, stores, checkpoints, part results)")
    ap.add_argument("--out", default=None, help="where summary.json/summary.txt go (default: $OUT or --work)")
    ap.add_argument("--lancedb-shim", choices=("auto", "force", "off"), default="auto")
    ap.add_argument("--timeouts", action="store_true", help="print the per-step timeouts as shell assignments")
    ap.add_argument("--fail-part", default="", help=argparse.SUPPRESS)  # tests: make a part fail on purpose
    ap.add_argument("--images", type=int, default=None, help="override: images through the pipeline")
    ap.add_argument("--batch", type=int, default=None, help="override: images per batch")
    ap.add_argument("--train-steps", type=int, default=None, help="override: SAE training steps before the checkpoint")
    args = ap.parse_args(argv)
    if args.plan:
        print(plan())
        return 0
    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    if args.timeouts:
        t = TIMEOUTS[mode]
        print(f"T_PRE={t['preflight']} T_EXTRACT={t['extract']} T_SAE_SPEED={t['sae_speed']} "
              f"T_SAE_TRAIN={t['sae_train']}")
        return 0
    sz = sizes_for(mode, {"images": args.images, "batch": args.batch, "train_steps": args.train_steps})
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    parts = tuple(p for p in args.parts.split(",") if p)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"unknown parts {unknown}; known: {', '.join(PARTS)}")
    signal.signal(signal.SIGTERM, _sigterm)
    fail = set(args.fail_part.split(",")) if args.fail_part else set()
    if args.preflight or args.all:
        info = preflight()
        (work / "preflight.json").write_text(json.dumps(info, indent=1))
        mods = info["modules"]
        print("preflight: " + ", ".join(f"{k} {v or 'MISSING'}" for k, v in mods.items()))
        print(f"preflight: tiny-dinov3 encode {info.get('tiny_dinov3_encode')}; /dev/shm free "
              f"{info.get('dev_shm_gb')} GB")
        print(f"preflight: cuda {info.get('cuda')} {info.get('gpu', '')} {info.get('gpu_memory_gb', '')} GB, "
              f"/tmp/site {'present' if info['tmp_site'] else 'absent'}, extract deps "
              f"{'ok' if info['extract_ready'] else 'MISSING (ray/lance: run the two wheel-install calls)'}"
              f"{', lancedb missing: extract uses the shim' if info['lancedb_shim_needed'] else ''}")
        if args.preflight:
            return 0
    if args.part:
        kwargs = _part_kwargs(args.part, args, mode)
        r = run_part(args.part, sz, work, fail=args.part in fail, **kwargs)
        for f in r["figures"]:
            print(f"  {f['name']}: {_fmt(f['value'], f['unit'])} {f['unit']}"
                  + (f"  (ref {_fmt(f['gpu_md'], f['unit'])}, ratio {_fmt(f['ratio'])})" if f["gpu_md"] else ""))
        print(f"[{args.part}] {r['status']}" + (f": {r['error']}" if r["error"] else ""))
        return 0 if r["status"] == "ok" else 1
    if args.all:
        for part in parts:
            kwargs = _part_kwargs(part, args, mode)
            run_part(part, sz, work, fail=part in fail, **kwargs)
    if args.summarize or args.all:
        results = {}
        for part in parts:
            p = work / f"{part}.json"
            if p.exists():
                results[part] = json.loads(p.read_text())
                if results[part]["status"] == "running":
                    results[part]["status"] = "timeout"
                    results[part]["error"] = results[part]["error"] or "killed by its timeout while running"
        pre_path = work / "preflight.json"
        pre = json.loads(pre_path.read_text()) if pre_path.exists() else None
        summary, text = summarize(results, mode, pre, parts)
        out = Path(args.out or os.environ.get("OUT") or work)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        (out / "summary.txt").write_text(text + "\n")
        print(text)
        print(f"summary: {out / 'summary.json'}")
        return 0 if summary["ok"] else 1
    ap.error("nothing to do: give --plan, --preflight, --part, --summarize or --all")
    return 2


if __name__ == "__main__":
    sys.exit(main())
