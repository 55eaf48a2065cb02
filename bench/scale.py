"""Cost that grows as the work grows: extraction, encode and evaluation of 10^3, 10^4 and 10^5 small images on a
one-node and on a three-node Ray cluster on this machine (`ray start` nodes, every port explicit), then Stage 1
streamed over a token set larger than a set memory cap.

For every (cluster, stage, size) it prints

* steady-state images/s: the slope of work done against time between 10 % and 90 % of the run (images out of the
  pipeline for extraction and encode, scored test images for evaluation), so start-up (Ray, actors, model build) is
  left out; the ratio to the smallest size says whether the cost per image stays flat;
* the wall time per size and the marginal rate between sizes, (N2 - N1) / (T2 - T1), in which start-up cancels
  (the slope above is only as good as the ticks: a stage whose output arrives in a few bursts has no steady part
  to measure at 10^3 images);
* peak memory of the driver (its VmHWM) and of the object store (the cluster's plasma bytes, polled every second).

Each stage runs as its own driver process (as `spg extract` would), so the driver's peak is that stage's own. The
images are tiny (32 px, a 3-block random-weight DINOv3, 2x2 tokens of d = 64) and grouped in categories of 1000
(800 train, 100 good and 100 defective test images with masks): a real dataset's categories hold hundreds of images,
and evaluation holds one category's maps at a time.

    python bench/scale.py                                # 1e3, 1e4, 1e5 on 1 and 3 nodes: about 40 minutes on 2 cores
    python bench/scale.py --sizes 1000 10000 --nodes 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # LocalCluster: the same `ray start` cluster the node-loss tests use

BACKBONE, WEIGHTS, SIZE = "tiny-dinov3", "random", 32
PER_CATEGORY = 1000  # 800 train/good, 100 test/good, 100 test/defect


# --------------------------------------------------------------------------------------------------------- data
def make_images(root: Path, categories: int, size: int = SIZE, seed: int = 0) -> None:
    """An MVTec-layout folder of ``categories`` x 1000 noise textures (a bright square on the defective ones, with
    its mask); written once and reused (a marker file says it is complete)."""
    from PIL import Image

    done = root / f".complete-{categories}"
    if done.exists():
        return
    rng = np.random.default_rng(seed)
    for c in range(categories):
        cat = root / f"cat{c:03d}"
        if (cat / ".complete").exists():
            continue
        base = rng.integers(40, 200, size=3)
        for split, kind, n in (("train", "good", 800), ("test", "good", 100), ("test", "defect", 100)):
            (cat / split / kind).mkdir(parents=True, exist_ok=True)
            if kind == "defect":
                (cat / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
                if kind == "defect":
                    y, x = rng.integers(0, size - 8, 2)
                    img[y:y + 8, x:x + 8] = 255
                    mask = np.zeros((size, size), np.uint8)
                    mask[y:y + 8, x:x + 8] = 255
                    Image.fromarray(mask).save(cat / "ground_truth" / kind / f"{i:03d}_mask.png")
                Image.fromarray(img).save(cat / split / kind / f"{i:03d}.png")
        (cat / ".complete").touch()
    done.touch()


def categories_for(n: int) -> list[str]:
    return [f"cat{c:03d}" for c in range(max(1, n // PER_CATEGORY))]


# ------------------------------------------------------------------------------------------------- child drivers
def child(args: argparse.Namespace) -> None:
    """One stage as its own driver process; prints one JSON line with what it did."""
    import ray

    from spg_dist.store import Store

    ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
    store = Store(args.store)
    out: dict = {}
    dataset = f"s{args.size}"
    done = 0

    def tick(n: int) -> None:  # work done so far, with a time stamp, for the parent's steady-state slope
        nonlocal done
        done += n
        print(json.dumps({"t": time.time(), "images": done}), flush=True)

    if args.child == "extract":
        from spg_dist.ray.extract import extract

        r = extract(store, f"mvtec:{args.data}@{dataset}", BACKBONE, weights=WEIGHTS, image_size=SIZE,
                    categories=categories_for(args.size), batch_size=64, num_actors=args.actors,
                    commit_every_s=2.0, progress=False, on_rows=tick)
        out = {"rows": r.rows_written, "layers": len(r.layers), "errors": len(r.errors), "seconds": r.seconds}
    elif args.child == "encode":
        from spg_dist.ray.encode import encode

        r = encode(store, args.sae_id, dataset=[dataset], batch_size=64, num_actors=args.actors,
                   commit_every_s=2.0, progress=False, on_images=tick)
        out = {"images": r.images_encoded, "seconds": r.seconds, "atoms_seconds": r.build.seconds if r.build else 0}
    elif args.child == "evaluate":
        from spg_dist.stages.detect import detect

        t0 = time.perf_counter()
        r = detect(store, "knn", dataset, shots=4, on_images=tick)
        out = {"images": done, "seconds": time.perf_counter() - t0, "image_auroc": r.mean["image_auroc"]}
    print(json.dumps({"result": out}), flush=True)


# ------------------------------------------------------------------------------------------------------ watching
def plasma_bytes(gcs: str) -> int:
    """Bytes in the cluster's object stores now (every node's plasma, as `ray memory --stats-only` adds them)."""
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    return int(get_memory_info_reply(get_state_from_address(gcs)).store_stats.object_store_bytes_used)


def peak_rss(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def table_rows(store: str, table: str, layers: int = 1) -> int:
    import lance

    try:
        return lance.dataset(f"{store}/{table}.lance").count_rows() // layers
    except Exception:  # not created yet
        return 0


def run_stage(stage: str, size: int, cluster, store: str, data: Path, actors: int, sae_id: str = "") -> dict:
    """Run one stage in a child driver while sampling its progress, its VmHWM and the object store every second."""
    cmd = [sys.executable, __file__, "--child", stage, "--address", cluster.gcs, "--store", store, "--data",
           str(data), "--size", str(size), "--actors", str(actors), "--sae-id", sae_id]
    samples: list[tuple[float, int]] = []
    peaks = {"driver": 0, "plasma": 0}
    proc = subprocess.Popen(cmd, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peaks["driver"] = max(peaks["driver"], peak_rss(proc.pid))
            try:
                peaks["plasma"] = max(peaks["plasma"], plasma_bytes(cluster.gcs))
            except Exception:
                pass
            stop.wait(1.0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result: dict = {}
    for line in proc.stdout:
        msg = json.loads(line) if line.startswith("{") else {}
        if "images" in msg and "t" in msg:
            samples.append((msg["t"], msg["images"]))
        result = msg.get("result", result)
    proc.wait()
    stop.set()
    watcher.join()
    if proc.returncode != 0 or not result:
        raise RuntimeError(f"{stage} of {size} images failed (exit {proc.returncode}); run: {' '.join(cmd)}")
    steady = steady_rate(samples) / result.get("layers", 1)  # extraction ticks count (image, layer) rows
    return {**result, "steady": steady, **{f"peak_{k}": v for k, v in peaks.items()}}


def steady_rate(samples: list[tuple[float, int]]) -> float:
    """Images/s between 10 % and 90 % of the work (a least-squares slope over the samples in that range)."""
    if not samples:
        return float("nan")
    total = max(n for _, n in samples)
    pts = [(t, n) for t, n in samples if 0.1 * total <= n <= 0.9 * total]
    if len({n for _, n in pts}) < 2:  # too few visible steps: the whole span
        first = next(t for t, n in samples if n > 0)
        last = next(t for t, n in samples if n == total)
        prev = max((t for t, n in samples if n == 0), default=first)
        return total / max(last - prev, 1e-9)
    t, n = np.array(pts, dtype=float).T
    return float(np.polyfit(t - t[0], n, 1)[0])


# ------------------------------------------------------------------------------------------------------- stage 1
STAGE1_GRID, STAGE1_DIM = 16, 64


def write_stage1_tokens(store: str, megabytes: float, seed: int = 0) -> int:
    """A store holding ``megabytes`` of fp16 patch tokens (16x16 grids of d = 64, one category), written straight
    as `patch_tokens` rows: Stage 1 reads nothing else. Returns the number of tokens."""
    import lance

    from spg_dist.store.tokens import tokens_to_arrow

    per_image = STAGE1_GRID * STAGE1_GRID * STAGE1_DIM * 2
    n_images = int(megabytes * 2**20 // per_image)
    uri = f"{store}/patch_tokens.lance"
    if os.path.exists(uri) and lance.dataset(uri).count_rows() == n_images:
        return n_images * STAGE1_GRID ** 2
    rng = np.random.default_rng(seed)
    mode = "overwrite"
    for s in range(0, n_images, 2000):
        n = min(2000, n_images - s)
        meta = {"backbone": [STAGE1_BACKBONE] * n, "layer": [1] * n, "image_id": [f"big/c/{s + i:07d}" for i in range(n)],
                "dataset": ["big"] * n, "category": ["c"] * n, "split": ["train"] * n, "label": [0] * n,
                "image_size": [224] * n}
        x = rng.standard_normal((n, STAGE1_GRID, STAGE1_GRID, STAGE1_DIM), dtype=np.float32)
        lance.write_dataset(tokens_to_arrow(meta, x, "random-init"), uri, mode=mode)
        mode = "append"
    return n_images * STAGE1_GRID ** 2


STAGE1_BACKBONE = "synthetic-d64"


def stream_vs_memory(store: str, cap_mb: float, token_mb: float, address: str) -> list[tuple[str, float, float, float]]:
    """Stage 1 (Ray Train, one worker) over a token set larger than the cap, streamed, then held in memory (the
    baseline, same data, same process); each worker's peak RSS comes from the training log."""
    from spg_dist.ray.train_sae import train_saes
    from spg_dist.store import Store

    n = write_stage1_tokens(store, token_mb)
    print(f"\nStage 1: {n} tokens = {token_mb:.0f} MB of fp16 tokens; a worker's memory cap {cap_mb:.0f} MB",
          flush=True)
    out = []
    for mode in ("stream", "memory"):
        t0 = time.perf_counter()
        r = train_saes(Store(store), STAGE1_BACKBONE, layer=1, Cs=(256,), ks=(8,), epochs=1, batch_tokens=4096,
                       data_mode=mode, run_name=f"scale-{mode}", address=address, log_every=100)
        seconds = time.perf_counter() - t0
        row = [m for m in r.models][0]
        peak = json.loads(row["metrics"])["worker_peak_rss_mb"]
        out.append((mode, seconds, peak, row["tokens_seen"] / seconds))
        verdict = "under" if peak <= cap_mb else "OVER"
        print(f"  stage 1 {mode:6s}: {seconds:6.1f} s, {row['tokens_seen'] / seconds:9.0f} tokens/s, worker peak RSS "
              f"{peak:7.1f} MB ({verdict} the cap)", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000], help="images per run")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 3], choices=[1, 3], help="cluster shapes to run")
    ap.add_argument("--stages", nargs="+", default=["extract", "encode", "evaluate"],
                    choices=["extract", "encode", "evaluate"])
    ap.add_argument("--workdir", default=None, help="where images and stores go (default: a temp dir, kept)")
    ap.add_argument("--stage1-tokens-mb", type=float, default=1536, help="size of Stage 1's token set (fp16)")
    ap.add_argument("--stage1-cap-mb", type=float, default=1024,
                    help="the training worker's memory cap (its whole RSS, Python/torch/Ray included)")
    ap.add_argument("--no-stage1", action="store_true", help="skip the Stage 1 stream/memory comparison")
    ap.add_argument("--child", choices=["extract", "encode", "evaluate"], help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--actors", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--sae-id", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from cluster import LocalCluster

    os.environ["RAY_AUTH_MODE"] = "token"  # as the cluster's nodes (this process reads its object store stats)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scale_"))
    data = work / "images"
    t0 = time.perf_counter()
    make_images(data, max(1, max(args.sizes) // PER_CATEGORY))
    print(f"images under {data} ({time.perf_counter() - t0:.0f} s to write)", flush=True)
    table: list[dict] = []
    for nodes in args.nodes:
        store = str(work / f"store_{nodes}node")
        shutil.rmtree(store, ignore_errors=True)  # every run measures the work from scratch
        (work / f"cluster_{nodes}").mkdir(parents=True, exist_ok=True)
        cluster = LocalCluster(work / f"cluster_{nodes}", head_cpus=2 if nodes == 1 else 1)
        cluster.start_head()
        try:
            for i in range(nodes - 1):
                cluster.add_worker(cpus=1, label=f"w{i}")
            cluster.wait_nodes(nodes)
            actors = 1 if nodes == 1 else 2
            sae_id = ""
            for size in sorted(args.sizes):
                for stage in args.stages:
                    if stage == "encode" and not sae_id:
                        sae_id = train_bench_sae(store, f"s{size}", cluster.gcs)
                    r = run_stage(stage, size, cluster, store, data, actors, sae_id)
                    table.append({"nodes": nodes, "stage": stage, "size": size, **r})
                    print(f"{nodes} node(s) {stage:8s} {size:>7d} images: steady {r['steady']:8.1f} img/s, "
                          f"{r['seconds']:7.1f} s in all, driver peak {r['peak_driver'] / 2**20:6.0f} MB, "
                          f"object store peak {r['peak_plasma'] / 2**20:6.1f} MB", flush=True)
            if not args.no_stage1 and nodes == args.nodes[-1]:
                stage1 = stream_vs_memory(str(work / "store_stage1"), args.stage1_cap_mb, args.stage1_tokens_mb,
                                          cluster.gcs)
        finally:
            cluster.stop()

    print("\nsteady-state images/s (ratio to the smallest size) and peak memory, driver / object store (MB):")
    for nodes in args.nodes:
        for stage in args.stages:
            rows = [r for r in table if r["nodes"] == nodes and r["stage"] == stage]
            ref = rows[0]["steady"]
            cells = "  ".join(f"{r['size']:>6d}: {r['steady']:7.1f} ({r['steady'] / ref:4.2f}x) "
                              f"{r['peak_driver'] / 2**20:5.0f}/{r['peak_plasma'] / 2**20:5.1f}" for r in rows)
            print(f"  {nodes} node(s) {stage:8s} {cells}")
    print("\nwall time per size, and the marginal rate between sizes ((N2 - N1) / (T2 - T1): start-up cancels, so "
          "a flat cost per image shows as equal marginal rates):")
    for nodes in args.nodes:
        for stage in args.stages:
            rows = [r for r in table if r["nodes"] == nodes and r["stage"] == stage]
            times = "  ".join(f"{r['size']:>6d}: {r['seconds']:6.1f} s" for r in rows)
            marg = "  ".join(f"{a['size']}->{b['size']}: {(b['size'] - a['size']) / max(b['seconds'] - a['seconds'], 1e-9):7.0f}"
                             for a, b in zip(rows, rows[1:]))
            print(f"  {nodes} node(s) {stage:8s} {times}   marginal img/s {marg}")
    if not args.no_stage1:
        (_, s_sec, s_peak, s_tps), (_, m_sec, m_peak, m_tps) = stage1
        print(f"\nStage 1 streamed: worker peak {s_peak:.0f} MB vs held in memory {m_peak:.0f} MB "
              f"({m_peak / s_peak:.2f}x); tokens/s streamed {s_tps:.0f} vs in memory {m_tps:.0f} "
              f"({s_tps / m_tps:.2f}x)")
    (work / "scale.json").write_text(json.dumps(table, indent=1))
    print(f"\nfigures: {work / 'scale.json'}")


def train_bench_sae(store: str, dataset: str, address: str) -> str:
    """A small SAE on the smallest dataset's tokens, for the encode runs (trained once per cluster)."""
    from spg_dist.ray.train_sae import train_saes
    from spg_dist.store import Store

    r = train_saes(Store(store), f"{BACKBONE}@{WEIGHTS}", layer=-1, Cs=(256,), ks=(8,), dataset=[dataset],
                   epochs=1, batch_tokens=1024, run_name="scale-encode", address=address, engine="local")
    return r.sae_ids[0]


if __name__ == "__main__":
    main()
