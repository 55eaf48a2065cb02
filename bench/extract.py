"""Extraction throughput: the Ray pipeline (decode tasks -> backbone actor pool -> fragment writers -> store)
against a bare PyTorch loop (decode, resize, forward, fp16 to host) over the same images and backbone, in the
same process. Prints medians over repeats, the ratio, stored bytes per image and the store's write throughput.

    python bench/extract.py                                   # CPU: dinov3-vits16 random weights, 224 px
    python bench/extract.py --backbone dinov3-vitl16 --image-size 448 --images 12288 --batch-size 64   # GPU
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bare_loop(records, backbone: str, weights: str | None, size: int, batch_size: int, device: str) -> float:
    """The baseline: what one process does with no pipeline at all (model build included, like an actor's)."""
    from spg_dist.backbones import create_backbone
    from spg_dist.data.imageio import load_image

    t0 = time.perf_counter()
    model = create_backbone(backbone, weights=weights, device=device, image_size=size)
    sink = 0
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        pixels = torch.from_numpy(np.stack([load_image(r.image_uri, size, model.spec.resample) for r in chunk]))
        out = model.encode(pixels)
        sink += sum(t.to(torch.float16).cpu().numpy().nbytes for t in out.values())
    assert sink > 0
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="dinov3-vits16", help="registry name")
    ap.add_argument("--weights", default="random", help="weights (default: seeded random init of the real architecture)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--images", type=int, default=312, help="number of images (synthesised, MVTec layout)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--cpus-per-actor", type=float, default=float(os.cpu_count() or 1))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", default=None, help="where data and stores go (default: a temp dir)")
    args = ap.parse_args()

    from spg_dist.data.spec import list_records
    from spg_dist.data.synth import synthesize
    from spg_dist.ray.extract import extract
    from spg_dist.ray.runtime import ensure_ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_extract_"))
    per_cat = max(1, args.images // 6)
    data = work / "data"
    if not data.exists():
        synthesize(data, layout="mvtec", seed=0, image_size=args.image_size, n_train=per_cat - 2, n_test_good=1,
                   n_test_bad=1)
    records = list_records(f"mvtec:{data}")
    n = len(records)
    torch.set_num_threads(os.cpu_count() or 1)  # the baseline gets the whole machine
    # Ray's CPU tasks (decode, write) get their own logical slots next to the actors, as they would on a node.
    ensure_ray(num_cpus=int(args.actors * args.cpus_per_actor) + 1)
    gpus = 1.0 if args.device == "cuda" else 0.0

    bare, ray_s, stored, write_bps = [], [], [], []
    for rep in range(args.repeats):
        bare.append(bare_loop(records, args.backbone, args.weights, args.image_size, args.batch_size, args.device))
        store = work / f"store_{rep}"
        shutil.rmtree(store, ignore_errors=True)
        res = extract(str(store), f"mvtec:{data}", args.backbone, weights=args.weights, image_size=args.image_size,
                      batch_size=args.batch_size, num_actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                      gpus_per_actor=gpus, progress=False, records=records)
        assert res.rows_written == n, res.summary()
        ray_s.append(res.seconds)
        stored.append(dir_bytes(store / "patch_tokens.lance") / n)
        write_bps.append(res.token_bytes / max(res.write_seconds, 1e-9))
        print(f"repeat {rep}: bare {n / bare[-1]:.1f} img/s, ray pipeline {n / ray_s[-1]:.1f} img/s")

    b, r = statistics.median(bare), statistics.median(ray_s)
    print(f"\nextract bench: {n} images, {args.backbone} ({args.weights}) @ {args.image_size}px, batch "
          f"{args.batch_size}, {args.actors} actor(s) x {args.cpus_per_actor:g} CPU, device {args.device}")
    print(f"  bare PyTorch loop : {n / b:8.1f} images/s (median of {args.repeats})")
    print(f"  Ray pipeline      : {n / r:8.1f} images/s (median, end to end incl. actor start and commit)")
    print(f"  ratio ray/bare    : {b / r:8.2f}")
    print(f"  stored bytes/image: {statistics.median(stored) / 1e3:8.1f} kB (fp16 tokens + Lance overhead)")
    print(f"  write throughput  : {statistics.median(write_bps) / 1e6:8.1f} MB/s per fragment writer")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
