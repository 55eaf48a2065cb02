"""Stage 1 benchmark, all on the same tokens in one run (medians printed, ratios against baselines):

  kernels  tokens/s, NMSE and dead fraction of (a) ours (sparse encoder backward + embedding-bag decoder, AuxK),
           (b) a plain dense-decoder TopK SAE in a few lines of autograd, (c) EleutherAI sparsify's SparseCoder
           (the peer, `pip install -c constraints.txt eai-sparsify==1.3.3`), at C = 8192 and 32768, k = 32, equal
           steps; plus ours without AuxK (dead fraction).
  grid     a 4-cell (C, k) grid trained in one `train_saes` pass vs four separate runs (Ray Train, from the store)
  loader   tokens/s from the store into the trainer vs the same bytes from a NumPy file
  query    latency of the top-8 atom queries (overall, within a category) on atom tables built from >= 10 M
           activations of sae_codes (indexed; and the unindexed scan). bench/atoms.py measures them in depth

    python bench/sae.py                       # everything, CPU-sized
    python bench/sae.py --sections kernels --d 1024 --batch 16384 --Cs 8192,131072   # GPU-sized
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

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "0" if torch.cuda.is_available() else "1")


# ------------------------------------------------------------------------------------------------ data
def sparse_tokens(n: int, d: int, true_atoms: int, active: int, seed: int = 0) -> torch.Tensor:
    """Tokens made of a few of many ground-truth directions plus noise: what an SAE is meant to recover."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(true_atoms, d, generator=g), dim=1)
    idx = torch.randint(0, true_atoms, (n, active), generator=g)
    coef = torch.rand(n, active, generator=g) * 2 + 0.2
    x = torch.nn.functional.embedding_bag(idx, atoms, per_sample_weights=coef, mode="sum")
    return (x + 0.05 * torch.randn(n, d, generator=g) + 0.3).contiguous()


# ------------------------------------------------------------------------------------------ baselines
class DenseTopK(torch.nn.Module):
    """The baseline: a TopK SAE as one writes it in a few lines of autograd (dense [N, C] codes and decode)."""

    def __init__(self, d: int, C: int, k: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.nn.functional.normalize(torch.randn(C, d, generator=g), dim=1)
        self.W_dec, self.W_enc = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
        self.b_enc, self.b_pre, self.k = torch.nn.Parameter(torch.zeros(C)), torch.nn.Parameter(torch.zeros(d)), k

    def forward(self, x):
        pre = (x - self.b_pre) @ self.W_enc.T + self.b_enc
        v, i = pre.topk(self.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, i, v.relu())
        return z @ self.W_dec + self.b_pre, i, v.relu()


def run_impl(kind: str, x_train: torch.Tensor, x_eval: torch.Tensor, C: int, k: int, steps: int, batch: int,
             dead_tokens: int, lr: float = 1e-3, device: str = "cpu") -> dict:
    """Train one SAE for ``steps`` equal steps; return tokens/s (median step), eval NMSE and dead fraction."""
    from spg_dist.sae import DeadLatentTracker, MultiSAETrainer, SAEConfig, TrainConfig
    from spg_dist.sae.preprocess import Preprocessing

    d = x_train.shape[1]
    tracker = DeadLatentTracker(C, dead_tokens, device=device)
    times = []
    if kind.startswith("ours"):
        cfg = SAEConfig(d=d, C=C, k=k, auxk=kind == "ours", dead_tokens=dead_tokens)
        tr = MultiSAETrainer([cfg], TrainConfig(lr=lr, batch_tokens=batch), Preprocessing(), device=device)
        tr.init_from_sample(x_train[:batch].to(device))

        def step(xb):
            tr.step(xb)

        def enc(xb):
            with torch.no_grad():
                out = tr.saes[0](xb)
            return out.x_hat, out.indices, out.values
        tracker = tr.trackers[0]
    elif kind == "dense":
        m = DenseTopK(d, C, k).to(device)
        with torch.no_grad():
            m.b_pre.copy_(x_train[:batch].mean(0))
        opt = torch.optim.Adam(m.parameters(), lr=lr)

        def step(xb):
            x_hat, i, v = m(xb)
            loss = (xb - x_hat).pow(2).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                m.W_dec.data = torch.nn.functional.normalize(m.W_dec.data, dim=1)
            tracker.update(i, v, xb.shape[0])

        def enc(xb):
            with torch.no_grad():
                return m(xb)
    elif kind == "sparsify":
        from sparsify import SaeConfig, SparseCoder

        m = SparseCoder(d, SaeConfig(num_latents=C, k=k), device=device, dtype=torch.float32)
        with torch.no_grad():
            m.b_dec.copy_(x_train[:batch].mean(0))
        opt = torch.optim.Adam(m.parameters(), lr=lr)

        def step(xb):
            out = m(xb, dead_mask=tracker.dead_mask())
            loss = out.fvu + out.auxk_loss / 32
            opt.zero_grad(set_to_none=True)
            loss.backward()
            m.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            m.set_decoder_norm_to_unit_norm()
            tracker.update(out.latent_indices, out.latent_acts, xb.shape[0])

        def enc(xb):
            with torch.no_grad():
                out = m(xb)
            return out.sae_out, out.latent_indices, out.latent_acts
    else:
        raise ValueError(kind)
    n = x_train.shape[0] // batch
    for s in range(steps):
        xb = x_train[(s % n) * batch:((s % n) + 1) * batch].to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(xb)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    x_hat, _, _ = enc(x_eval.to(device))
    xe = x_eval.to(device)
    nmse = float((xe - x_hat).pow(2).sum() / (xe - xe.mean(0)).pow(2).sum())
    return {"tokens_per_s": batch / statistics.median(times[2:] or times), "nmse": nmse,
            "dead": tracker.dead_fraction(dead_tokens)}


def section_kernels(args) -> None:
    Cs = [int(c) for c in args.Cs.split(",")]
    x = sparse_tokens(args.batch * 8 + 8192, args.d, 4 * max(Cs), 32, seed=1)
    x_train, x_eval = x[:-8192], x[-8192:]
    kinds = ["ours", "ours-noauxk", "dense"]
    try:
        import sparsify  # noqa: F401

        kinds.append("sparsify")
    except ImportError:
        print("  (sparsify not installed: pip install -c constraints.txt eai-sparsify==1.3.3 to include the peer)")
    dead_tokens = args.batch * 4
    print(f"\n[kernels] d={args.d}, k=32, batch {args.batch} tokens, {args.steps} equal steps, "
          f"dead after {dead_tokens} tokens, device {args.device}")
    print(f"  {'C':>7} {'impl':12s} {'tokens/s':>11} {'vs dense':>9} {'eval NMSE':>10} {'dead %':>7}")
    for C in Cs:
        res = {kind: run_impl(kind, x_train, x_eval, C, 32, args.steps, args.batch, dead_tokens, device=args.device)
               for kind in kinds}
        for kind, r in res.items():
            print(f"  {C:>7} {kind:12s} {r['tokens_per_s']:>11,.0f} {r['tokens_per_s'] / res['dense']['tokens_per_s']:>8.2f}x "
                  f"{r['nmse']:>10.4f} {100 * r['dead']:>6.1f}")


def section_auxk(args) -> None:
    """Dead latents only appear when the dictionary is wider than the data needs and training runs long enough:
    128 true directions, C = 4096, k = 8, 300 steps of 2048 tokens, dead after 4 batches without firing."""
    d, C, k, batch, steps = 64, 4096, 8, 2048, args.auxk_steps
    x = sparse_tokens(batch * 16 + 8192, d, 128, 4, seed=3)
    dead_tokens = 4 * batch
    print(f"\n[auxk] d={d}, C={C}, k={k}, data from 128 true directions, {steps} steps of {batch} tokens, "
          f"dead after {dead_tokens} tokens")
    kinds = ["ours", "ours-noauxk"]
    try:
        import sparsify  # noqa: F401

        kinds.append("sparsify")
    except ImportError:
        pass
    for kind in kinds:
        r = run_impl(kind, x[:-8192], x[-8192:], C, k, steps, batch, dead_tokens, device=args.device)
        print(f"  {kind:12s} dead {100 * r['dead']:5.1f}%   eval NMSE {r['nmse']:.4f}   {r['tokens_per_s']:,.0f} tokens/s")


def section_grid(args, work: Path) -> None:
    from spg_dist.ray.train_sae import train_saes

    store = make_store(work / "grid_store", args.d, images=args.grid_images)
    common = dict(batch_tokens=args.batch, epochs=1, checkpoint_every=10_000, log_every=10_000)
    t0 = time.perf_counter()
    train_saes(store, "bench", Cs=[2048, 4096], ks=[16, 32], run_name="grid-one-pass", **common)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    for C in (2048, 4096):
        for k in (16, 32):
            train_saes(store, "bench", Cs=[C], ks=[k], run_name=f"grid-{C}-{k}", **common)
    four = time.perf_counter() - t0
    print(f"\n[grid] 4 SAEs (C in 2048,4096 x k in 16,32), d={args.d}, {args.grid_images * 256} tokens, 1 epoch, "
          f"Ray Train from the store")
    print(f"  one pass: {one:7.1f} s   four runs: {four:7.1f} s   speed-up {four / one:.2f}x")


def make_store(path: Path, d: int, images: int):
    from spg_dist.store import Store, load_schema, tokens_to_arrow, write_fragment

    if path.exists():
        return Store(path)
    store = Store(path)
    toks = sparse_tokens(images * 256, d, 4 * 4096, 32, seed=2).reshape(images, 16, 16, d).numpy()
    for s in range(0, images, 256):
        n = min(256, images - s)
        meta = dict(backbone=["bench"] * n, layer=[1] * n, image_id=[f"b/{i:06d}" for i in range(s, s + n)],
                    dataset=["b"] * n, category=[f"c{i % 6}" for i in range(s, s + n)], split=["train"] * n,
                    label=[0] * n, image_size=[224] * n)
        store.commit_fragments("patch_tokens", write_fragment(store.lance_uri("patch_tokens"),
                                                              tokens_to_arrow(meta, toks[s:s + n], "synthetic"),
                                                              load_schema("patch_tokens")))
    return store


def section_loader(args, work: Path) -> None:
    from spg_dist.ray.sae_data import load_shard
    from spg_dist.store.tokens import TokenSelection
    from spg_dist.store import TokenDataset

    store = make_store(work / "loader_store", args.d, images=args.loader_images)
    flt = TokenSelection.of("bench", 1)
    arr = load_shard(store, flt).numpy()
    npy = work / "tokens.npy"
    np.save(npy, arr)
    reps = []
    for _ in range(3):
        t0 = time.perf_counter()
        got = load_shard(store, flt)
        t1 = time.perf_counter()
        ref = torch.from_numpy(np.load(npy))
        t2 = time.perf_counter()
        n = sum(b.shape[0] for b in TokenDataset(store, "bench", 1, images_per_block=256))
        t3 = time.perf_counter()
        assert got.shape == ref.shape and n == got.shape[0]
        reps.append((t1 - t0, t2 - t1, t3 - t2))
    n_tok = arr.shape[0]
    shard, npy_s, stream = (statistics.median(r[i] for r in reps) for i in range(3))
    print(f"\n[loader] {n_tok:,} tokens x d={args.d} fp16 ({arr.nbytes / 1e6:.0f} MB)")
    print(f"  store -> worker shard (memory mode): {n_tok / shard / 1e6:7.2f} M tokens/s "
          f"({arr.nbytes / shard / 1e9:.2f} GB/s)")
    print(f"  store -> torch TokenDataset stream : {n_tok / stream / 1e6:7.2f} M tokens/s")
    print(f"  NumPy np.load of the same bytes    : {n_tok / npy_s / 1e6:7.2f} M tokens/s   "
          f"(store/NumPy = {npy_s / shard:.2f}x)")


def section_query(args, work: Path) -> None:
    import pyarrow as pa

    from spg_dist.store import Store, codes, load_schema, write_fragment
    from spg_dist.store.atoms import top_patches
    from spg_dist.store.filters import where

    store = Store(work / "query_store")
    C, k, grid, sae = 8192, 32, 16, "bench/L1/topk-C8192-k32/q"
    n_img = -(-args.query_rows // (grid * grid * k))
    rng = np.random.default_rng(0)
    if store.count("sae_codes", where(sae_id=sae)) < n_img:
        schema = load_schema("sae_codes")
        for s in range(0, n_img, 256):
            n = min(256, n_img - s)
            e = n * grid * grid * k
            idx = np.stack([rng.permutation(C)[:k] for _ in range(64)]).astype(np.int32)   # 64 distinct-atom rows
            idx = idx[rng.integers(0, 64, n * grid * grid)].ravel()
            offs = pa.array(np.arange(n + 1, dtype=np.int64) * grid * grid * k)
            t = pa.table({"sae_id": [sae] * n, "image_id": [f"b/{s + i:06d}" for i in range(n)],
                          "dataset": ["b"] * n, "category": [f"c{(s + i) % 12}" for i in range(n)],
                          "split": ["test"] * n, "label": pa.array(np.zeros(n, np.int8)),
                          "grid_h": pa.array([grid] * n, pa.int16()), "grid_w": pa.array([grid] * n, pa.int16()),
                          "k": pa.array([k] * n, pa.int32()),
                          "indices": pa.LargeListArray.from_arrays(offs, pa.array(idx)),
                          "values": pa.LargeListArray.from_arrays(offs, pa.array(rng.random(e).astype(np.float32)
                                                                                 + np.float32(1e-3)))})
            codes.commit(store, write_fragment(codes.lance_uri(store), schema.validate(t), schema))
    t0 = time.perf_counter()
    built = codes.build_atoms(store, sae, top_n=64, C=C, index=False)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    codes.ensure_atom_indexes(store)
    t_index = time.perf_counter() - t0
    atoms = rng.integers(0, C, 30)
    top_patches(store, sae, 0, 8)
    lat_cat, lat_all = [], []
    for a in atoms:
        t0 = time.perf_counter()
        top_patches(store, sae, int(a), 8, category="c3")
        lat_cat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        top_patches(store, sae, int(a), 8)
        lat_all.append(time.perf_counter() - t0)
    ds = store.table("atom_top").to_lance()
    scan = []
    for a in atoms[:5]:
        t0 = time.perf_counter()
        ds.to_table(filter=where(sae_id=sae, atom=int(a), scope="c3"), use_scalar_index=False)
        scan.append(time.perf_counter() - t0)
    print(f"\n[query] atom tables of {n_img * grid * grid * k:,} activations: {store.count('atom_images'):,} "
          f"atom_images + {store.count('atom_top'):,} atom_top rows (build {t_build:.1f} s"
          f"{'' if built.rebuilt else ', reused'}, indexes {t_index:.1f} s)")
    print(f"  top-8 of an atom within a category (atom_top): {1e3 * statistics.median(lat_cat):7.1f} ms median")
    print(f"  top-8 of an atom (atom_top)                  : {1e3 * statistics.median(lat_all):7.1f} ms median")
    print(f"  the category lookup as a full scan           : {1e3 * statistics.median(scan):7.1f} ms median "
          f"({statistics.median(scan) / statistics.median(lat_cat):.0f}x slower)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="kernels,auxk,grid,loader,query")
    ap.add_argument("--auxk-steps", type=int, default=300)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--Cs", default="8192,32768")
    ap.add_argument("--grid-images", type=int, default=256)
    ap.add_argument("--loader-images", type=int, default=2048)
    ap.add_argument("--query-rows", type=int, default=10_000_000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_sae_"))
    work.mkdir(parents=True, exist_ok=True)
    sections = args.sections.split(",")
    if "kernels" in sections:
        section_kernels(args)
    if "auxk" in sections:
        section_auxk(args)
    if "loader" in sections:
        section_loader(args, work)
    if "query" in sections:
        section_query(args, work)
    if "grid" in sections:
        from spg_dist.ray.runtime import ensure_ray

        ensure_ray(num_cpus=os.cpu_count())
        section_grid(args, work)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
