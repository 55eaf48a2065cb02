"""Atom tables at scale: today's design (one ``atom_index`` row per activation) against the new one (``atom_images``,
one row per (atom, image), plus ``atom_top`` per atom overall and per category), both built in this process from
the same synthetic ``sae_codes``.

The codes are generated directly (no SAE), in chunks of images, in bounded memory: ``--images`` images of
``--grid``² patches, k distinct atoms per patch out of C, drawn half from a global Zipf law (p ∝ 1/(rank + 8)^1.1)
and half from a per-category permutation of it (so atoms have categories they prefer), values Gamma(2, 0.5). Defaults: 4,000 images
× 784 patches × k = 32 = 100.4 M activations over C = 4,096 and 6 categories.

Measured, per design: bytes on disk per activation (data; data + scalar indexes), build throughput (activations/s;
the old design as the old encode did it: atom_index rows per batch, written as fragments, and a per-batch top-N
reduction with the same lexsort, then BTree/Bitmap indexes), and query latency medians over random atoms (top-8 of
an atom, top-8 within a category, which images fire an atom). The old design is built on the first
``--baseline-images`` images (default: all; ``--baseline-images 400`` = 10 M rows when 10^8 rows take too long) and
its bytes and build time are then extrapolated linearly in activations (rows, bytes and work of atom_index are per
activation), its query latencies measured on that subset (which flatters it). Bytes are those of each table's
current version (data files its fragments reference, its current index files).

    python bench/atoms.py                              # the defaults above (several minutes)
    python bench/atoms.py --images 400                 # quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa

from spg_dist.store import Store, codes, load_schema, write_fragment
from spg_dist.store.atoms import images_firing, sae_info, top_patches
from spg_dist.store.filters import where

SAE = "bench/L24/topk-C4096-k32"
OLD_INDEX_SCHEMA = pa.schema(
    [pa.field("sae_id", pa.string(), False), pa.field("atom", pa.int32(), False),
     pa.field("image_id", pa.string(), False), pa.field("category", pa.string(), False),
     pa.field("split", pa.string(), False), pa.field("label", pa.int8(), False),
     pa.field("patch", pa.int32(), False), pa.field("value", pa.float32(), False)],
    metadata={b"spg.schema_version": b"1", b"spg.table": b"atom_index",
              b"spg.key": b"sae_id,atom,image_id,patch"})
OLD_TOP_SCHEMA = pa.schema(
    [pa.field("sae_id", pa.string(), False), pa.field("atom", pa.int32(), False),
     pa.field("rank", pa.int32(), False), pa.field("image_id", pa.string(), False),
     pa.field("category", pa.string(), False), pa.field("patch", pa.int32(), False),
     pa.field("row", pa.int16(), False), pa.field("col", pa.int16(), False), pa.field("value", pa.float32(), False)],
    metadata={b"spg.schema_version": b"1", b"spg.table": b"atom_top"})


# ------------------------------------------------------------------------------------------------ codes
def generate(store: Store, args) -> int:
    """Write the synthetic sae_codes (committed per chunk, as encode does); returns activations."""
    rng = np.random.default_rng(args.seed)
    C, k, P = args.C, args.k, args.grid * args.grid
    cats = [f"cat{i}" for i in range(args.categories)]
    w = 1.0 / (np.arange(C) + 8.0) ** args.zipf
    cdf = np.cumsum(w / w.sum())
    perms = np.stack([rng.permutation(C) for _ in cats])
    schema = load_schema(codes.CODES)
    total = 0
    for start in range(0, args.images, args.chunk):
        n = min(args.chunk, args.images - start)
        cat = (np.arange(start, start + n) * len(cats)) // args.images           # images grouped by category
        a = np.minimum(np.searchsorted(cdf, rng.random((n, P * k))), C - 1)
        own = rng.random((n, P * k)) < 0.5
        a = np.where(own, perms[cat][np.arange(n)[:, None], a], a).reshape(n * P, k)
        for _ in range(6):                                                         # k distinct atoms per patch
            a.sort(axis=1)
            dup = np.zeros_like(a, bool)
            dup[:, 1:] = a[:, 1:] == a[:, :-1]
            if not dup.any():
                break
            a[dup] = rng.integers(0, C, int(dup.sum()))
        a.sort(axis=1)
        dup = np.zeros_like(a, bool)
        dup[:, 1:] = a[:, 1:] == a[:, :-1]
        assert not dup.any()
        v = rng.gamma(2.0, 0.5, (n * P, k)).astype(np.float32) + np.float32(1e-3)
        offs = pa.array(np.arange(n + 1, dtype=np.int64) * P * k)
        ids = [f"synth/{cats[c]}/test/{start + i:06d}" for i, c in enumerate(cat)]
        t = pa.table({"sae_id": [SAE] * n, "image_id": ids, "dataset": ["synth"] * n,
                      "category": [cats[c] for c in cat], "split": ["test"] * n,
                      "label": pa.array((rng.random(n) < 0.3).astype(np.int8)),
                      "grid_h": pa.array([args.grid] * n, pa.int16()), "grid_w": pa.array([args.grid] * n, pa.int16()),
                      "k": pa.array([k] * n, pa.int32()),
                      "indices": pa.LargeListArray.from_arrays(offs, pa.array(a.astype(np.int32).ravel())),
                      "values": pa.LargeListArray.from_arrays(offs, pa.array(v.ravel()))})
        codes.commit(store, write_fragment(codes.lance_uri(store), schema.validate(t), schema))
        total += n * P * k
    store.upsert("sae_models", [dict(
        sae_id=SAE, backbone="bench", layer=24, d=1024, C=C, k=k, sparsifier="topk", run="bench", config="{}",
        metrics="{}", nmse=0.0, explained_variance=1.0, l0=float(k), dead_fraction=0.0, steps=0, tokens_seen=0,
        weights=b"", firing_histogram_png=b"", run_dir="", created_at=__import__("datetime").datetime(2026, 1, 1))])
    return total


def du(uri: str) -> tuple[int, int]:
    """(data bytes, index bytes) of a Lance table's *current* version: the data and deletion files its fragments
    reference and the files of its current indexes (files of superseded versions, which Lance keeps until a
    cleanup, are not counted)."""
    ds = lance.dataset(uri)
    data = 0
    for f in ds.get_fragments():   # (no deletion files here: a rebuild drops whole fragments)
        data += sum(os.path.getsize(os.path.join(ds.uri, "data", d.path)) for d in f.data_files())
    idx = 0
    for i in ds.list_indices():
        d = os.path.join(ds.uri, "_indices", str(i["uuid"]))
        idx += sum(os.path.getsize(os.path.join(r, x)) for r, _, fs in os.walk(d) for x in fs)
    return data, idx


# ------------------------------------------------------------------------------------------------ old design
def old_atom_rows(rows: pa.Table) -> pa.Table:
    """Today's ``atom_rows`` (spg_dist/ray/encode.py before this change), verbatim."""
    n = rows.num_rows
    k = int(rows.column("k")[0].as_py())
    p = int(rows.column("grid_h")[0].as_py()) * int(rows.column("grid_w")[0].as_py())
    idx = rows.column("indices").combine_chunks().flatten().to_numpy().reshape(n, p, k)
    val = rows.column("values").combine_chunks().flatten().to_numpy().reshape(n, p, k)
    img, patch, _ = np.nonzero(val > 0)
    nz = val > 0
    take = pa.array(img)
    return pa.table({"sae_id": rows.column("sae_id").take(take), "atom": pa.array(idx[nz], pa.int32()),
                     "image_id": rows.column("image_id").take(take), "category": rows.column("category").take(take),
                     "split": rows.column("split").take(take), "label": rows.column("label").take(take),
                     "patch": pa.array(patch, pa.int32()), "value": pa.array(val[nz], pa.float32())})


def old_top(t: pa.Table, top_n: int) -> pa.Table:
    """Today's per-batch top-N reduction (``_top`` / ``top_per_atom``), verbatim in effect."""
    ids = np.asarray(t.column("image_id").to_pylist(), dtype=object)
    order = np.lexsort((t.column("patch").to_numpy(), ids.astype(str), -t.column("value").to_numpy(),
                        t.column("atom").to_numpy()))
    a = t.column("atom").to_numpy()[order]
    starts = np.r_[0, np.flatnonzero(a[1:] != a[:-1]) + 1]
    rank = np.arange(len(a)) - np.repeat(starts, np.diff(np.r_[starts, len(a)]))
    return t.take(pa.array(order[rank < top_n]))


def build_old(store: Store, n_images: int, top_n: int, batch: int) -> dict:
    """atom_index (+ the old atom_top) of the first n_images images, as the old encode wrote them."""
    db = store.db
    for name in ("old_atom_index", "old_atom_top"):
        if name in db.list_tables().tables:
            db.drop_table(name)
    tbl = db.create_table("old_atom_index", schema=OLD_INDEX_SCHEMA)
    uri = tbl.to_lance().uri
    keep_ids = sorted(set(store.read(codes.CODES, where(sae_id=SAE), ["image_id"]).column("image_id").to_pylist()))
    keep_ids = keep_ids[:n_images]
    t0 = time.perf_counter()
    frags, cand, rows = [], None, 0
    ds = store.lance(codes.CODES)
    for b in ds.to_batches(columns=["sae_id", "image_id", "category", "split", "label", "grid_h", "grid_w", "k",
                                    "indices", "values"], filter=where(sae_id=SAE, image_id=keep_ids),
                           batch_size=batch):
        if b.num_rows == 0:
            continue
        idx_rows = old_atom_rows(pa.Table.from_batches([b]))
        rows += idx_rows.num_rows
        frags += lance.fragment.write_fragments(idx_rows, uri, schema=OLD_INDEX_SCHEMA)
        c = old_top(idx_rows, top_n).select(["atom", "image_id", "category", "patch", "value"])
        cand = old_top(pa.concat_tables([cand, c]) if cand is not None else c, top_n)
    ds_i = lance.dataset(uri)
    lance.LanceDataset.commit(uri, lance.LanceOperation.Append(frags), read_version=ds_i.version)
    atoms = cand.column("atom").to_numpy()
    starts = np.r_[0, np.flatnonzero(atoms[1:] != atoms[:-1]) + 1]
    rank = np.arange(len(atoms)) - np.repeat(starts, np.diff(np.r_[starts, len(atoms)]))
    patch = cand.column("patch").to_numpy()
    db.create_table("old_atom_top", data=pa.table({
        "sae_id": [SAE] * cand.num_rows, "atom": cand.column("atom"), "rank": pa.array(rank, pa.int32()),
        "image_id": cand.column("image_id"), "category": cand.column("category"), "patch": cand.column("patch"),
        "row": pa.array(patch // 28, pa.int16()), "col": pa.array(patch % 28, pa.int16()),
        "value": cand.column("value")}, schema=OLD_TOP_SCHEMA))
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    from lancedb.index import Bitmap, BTree

    tbl = db.open_table("old_atom_index")
    tbl.create_index("atom", config=BTree())
    tbl.create_index("sae_id", config=Bitmap())
    tbl.create_index("category", config=Bitmap())
    top = db.open_table("old_atom_top")
    top.create_index("atom", config=BTree())
    top.create_index("sae_id", config=Bitmap())
    t_index = time.perf_counter() - t0
    return {"rows": rows, "build_s": t_build, "index_s": t_index, "uri": uri, "top_uri": top.to_lance().uri}


def old_queries(store: Store, atoms: list[int], category: str, reps: int) -> dict:
    """The old query paths as the old ``top_patches`` ran them (sae_info, then one open and one indexed scan):
    top-8 overall from the old atom_top, within a category from atom_index (filter + sort), which images from
    atom_index (filter + group by image)."""
    sae_info(store, SAE)
    order = [("value", "descending"), ("image_id", "ascending"), ("patch", "ascending")]
    lat = {"top8": [], "top8_cat": [], "images": []}
    for _ in range(reps):
        for a in atoms:
            t0 = time.perf_counter()
            sae_info(store, SAE)
            store.read("old_atom_top", where(sae_id=SAE, atom=a),
                       ["rank", "image_id", "category", "patch", "value"]).sort_by("rank").slice(0, 8)
            lat["top8"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sae_info(store, SAE)
            store.read("old_atom_index", where(sae_id=SAE, atom=a, category=category),
                       ["image_id", "category", "patch", "value"]).sort_by(order).slice(0, 8)
            lat["top8_cat"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sae_info(store, SAE)
            t = store.read("old_atom_index", where(sae_id=SAE, atom=a), ["image_id", "value"])
            t.group_by("image_id").aggregate([("value", "count"), ("value", "sum"), ("value", "max")])
            lat["images"].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in lat.items()}


def new_queries(store: Store, atoms: list[int], category: str, reps: int) -> dict:
    sae_info(store, SAE)                              # warm the per-version cache, as any second query finds it
    lat = {"top8": [], "top8_cat": [], "images": []}
    sizes = []
    for _ in range(reps):
        for a in atoms:
            t0 = time.perf_counter()
            top_patches(store, SAE, a, 8)
            lat["top8"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            top_patches(store, SAE, a, 8, category=category)
            lat["top8_cat"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sizes.append(images_firing(store, SAE, a).num_rows)
            lat["images"].append(time.perf_counter() - t0)
    out = {k: statistics.median(v) for k, v in lat.items()}
    out["p90"] = {k: float(np.percentile(v, 90)) for k, v in lat.items()}
    out["images_rows_median"] = statistics.median(sizes)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--grid", type=int, default=28)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--C", type=int, default=4096)
    ap.add_argument("--categories", type=int, default=6)
    ap.add_argument("--zipf", type=float, default=1.1, help="exponent of the atoms' Zipf law (higher: more skewed)")
    ap.add_argument("--top-n", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=64, help="images per generated chunk / build batch")
    ap.add_argument("--baseline-images", default="all", help="images for the old atom_index ('all' = every image)")
    ap.add_argument("--queries", type=int, default=30, help="random atoms per query kind")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keep the store here (re-runs reuse the generated codes)")
    ap.add_argument("--json", default=None, help="also write the numbers of the table to this JSON file")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_atoms_"))
    work.mkdir(parents=True, exist_ok=True)
    store = Store(work / "store")
    cfg = {k: getattr(args, k) for k in ("images", "grid", "k", "C", "categories", "zipf", "seed")}
    marker = work / "codes.json"
    t0 = time.perf_counter()
    if not marker.exists() or json.loads(marker.read_text()) != cfg:
        shutil.rmtree(work / "store", ignore_errors=True)
        store = Store(work / "store")
        generate(store, args)
        marker.write_text(json.dumps(cfg))
    t_gen = time.perf_counter() - t0
    P = args.grid * args.grid
    acts = args.images * P * args.k
    print(f"[codes] {args.images:,} images x {P} patches x k={args.k} = {acts:,} activations over C={args.C}, "
          f"{args.categories} categories (generated/reused in {t_gen:.0f} s) in {store.uri}")
    codes_bytes = du(store.lance_uri(codes.CODES))[0]

    # ---- new design
    t0 = time.perf_counter()
    res = codes.build_atoms(store, SAE, top_n=args.top_n, C=args.C, force=True, index=False,
                            batch_images=args.chunk)
    t_new = time.perf_counter() - t0
    t0 = time.perf_counter()
    codes.ensure_atom_indexes(store)
    t_new_idx = time.perf_counter() - t0
    assert res.activations == acts, (res.activations, acts)
    img_b, top_b = du(store.lance_uri(codes.IMAGES)), du(store.lance_uri(codes.TOP))
    new_data, new_idx = img_b[0] + top_b[0], img_b[1] + top_b[1]
    print(f"[new] {res.summary()}; indexes {t_new_idx:.1f} s")

    # ---- old design (subset)
    nb = args.images if args.baseline_images == "all" else min(int(args.baseline_images), args.images)
    old = build_old(store, nb, args.top_n, args.chunk)
    scale = acts / old["rows"]
    # atom_top is per atom, not per activation: extrapolate atom_index only, keep the old atom_top as measured
    old_top_b = du(old["top_uri"])
    old_data_full = (du(old["uri"])[0]) * scale + old_top_b[0]
    old_idx_full = du(old["uri"])[1] * scale + old_top_b[1]
    print(f"[old] atom_index of {nb:,} images: {old['rows']:,} rows, built in {old['build_s']:.1f} s, indexed in "
          f"{old['index_s']:.1f} s (x{scale:.2f} to the full set, linearly)")

    # ---- queries
    rng = np.random.default_rng(1)
    atoms = [int(a) for a in rng.integers(0, args.C, args.queries)]
    qn = new_queries(store, atoms, "cat0", args.reps)
    qo = old_queries(store, atoms, "cat0", args.reps)

    # ---- the table
    per = lambda b: b / acts  # noqa: E731
    rows_new = res.atom_images_rows + res.atom_top_rows
    print()
    print(f"{'':44s} {'sae_codes':>12} {'old design':>12} {'new design':>12} {'new/old':>9} {'new/codes':>10}")
    print(f"{'rows per SAE':44s} {args.images:>12,} {acts:>12,.0f} {rows_new:>12,} "
          f"{rows_new / acts:>9.4f} {'':>10}")
    print(f"{'  of which atom_images / atom_top':44s} {'':>12} {'':>12} "
          f"{res.atom_images_rows:>6,}/{res.atom_top_rows:<,}")
    print(f"{'bytes/activation, data':44s} {per(codes_bytes):>12.3f} {per(old_data_full):>12.3f} "
          f"{per(new_data):>12.3f} {new_data / old_data_full:>9.3f} {new_data / codes_bytes:>10.3f}")
    print(f"{'bytes/activation, data + indexes':44s} {per(codes_bytes):>12.3f} "
          f"{per(old_data_full + old_idx_full):>12.3f} {per(new_data + new_idx):>12.3f} "
          f"{(new_data + new_idx) / (old_data_full + old_idx_full):>9.3f} {(new_data + new_idx) / codes_bytes:>10.3f}")
    print(f"{'MB per SAE (this store), data + indexes':44s} {codes_bytes / 1e6:>12.1f} "
          f"{(old_data_full + old_idx_full) / 1e6:>12.1f} {(new_data + new_idx) / 1e6:>12.1f}")
    old_tp = old["rows"] / (old["build_s"] + old["index_s"])
    new_tp = acts / (t_new + t_new_idx)
    print(f"{'build, activations/s (incl. indexes)':44s} {'':>12} {old_tp:>12,.0f} {new_tp:>12,.0f} "
          f"{new_tp / old_tp:>9.2f}")
    print(f"{'build, activations/s (tables only)':44s} {'':>12} {old['rows'] / old['build_s']:>12,.0f} "
          f"{acts / t_new:>12,.0f} {(acts / t_new) / (old['rows'] / old['build_s']):>9.2f}")
    label = "build time for this SAE, s" + (" (old: extrapolated)" if scale != 1 else "")
    print(f"{label:44s} {'':>12} "
          f"{(old['build_s'] + old['index_s']) * scale:>12.1f} {t_new + t_new_idx:>12.1f}")
    for key, label in (("top8", "query ms: top-8 of an atom"), ("top8_cat", "query ms: top-8 within a category"),
                       ("images", "query ms: which images fire an atom")):
        print(f"{label:44s} {'':>12} {1e3 * qo[key]:>12.1f} {1e3 * qn[key]:>12.1f} {qn[key] / qo[key]:>9.2f}")
    print(f"  (medians over {args.queries} random atoms x {args.reps}; old on {old['rows']:,} rows"
          f"{' (a subset)' if scale != 1 else ''}; new p90: "
          + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in qn["p90"].items())
          + f"; which-images returns {qn['images_rows_median']:.0f} images at the median)")
    paper = 12.6e6 * 32
    print(f"\n[paper scale] 12.6 M tokens x k=32 = {paper / 1e6:.0f} M activations per SAE: sae_codes "
          f"{per(codes_bytes) * paper / 1e9:.1f} GB, old atom_index {per(old_data_full + old_idx_full) * paper / 1e9:.1f} GB "
          f"({paper / 1e6:.0f} M rows), new {per(new_data + new_idx) * paper / 1e9:.2f} GB "
          f"(~{rows_new / acts * paper / 1e6:.0f} M rows at this store's firing pattern); x50 SAEs (25 (C, k) cells x 2 "
          f"directions): old {50 * per(old_data_full + old_idx_full) * paper / 1e12:.2f} TB / "
          f"{50 * paper / 1e9:.1f} G rows, new {50 * per(new_data + new_idx) * paper / 1e12:.2f} TB")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "activations": acts, "images": args.images, "old_rows_measured": old["rows"], "old_scale": scale,
            "rows": {"old": acts, "atom_images": res.atom_images_rows, "atom_top": res.atom_top_rows},
            "bytes": {"sae_codes": codes_bytes, "old_data": old_data_full, "old_index": old_idx_full,
                      "new_data": new_data, "new_index": new_idx},
            "build_s": {"old_tables": old["build_s"] * scale, "old_indexes": old["index_s"] * scale,
                        "new_tables": t_new, "new_indexes": t_new_idx},
            "query_ms": {"old": {k: 1e3 * v for k, v in qo.items()},
                         "new": {k: 1e3 * qn[k] for k in ("top8", "top8_cat", "images")}}}, indent=1))
    checks = {"top-8 of an atom < 50 ms": qn["top8"] < 0.05, "top-8 within a category < 50 ms": qn["top8_cat"] < 0.05,
              "new storage within 1.5x of sae_codes": (new_data + new_idx) <= 1.5 * codes_bytes}
    for name, ok in checks.items():
        print(f"[check] {name}: {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
