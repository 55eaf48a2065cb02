"""``spg encode``: SAE codes for every stored token of a dataset, through a Ray Data actor pool.

patch_tokens (read by Ray Data from the store) -> SAE actors (codes per image) -> writer tasks (a fragment of
``sae_codes`` and of ``atom_index`` each, plus this batch's per-atom top-N candidates) -> driver (commits, and
a running top-N per atom that becomes ``atom_top``). The top-N of a union is the top-N of the parts' top-Ns, so
``atom_top`` is exact without a second pass, and a re-run merges with what is stored.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from spg_dist.sae import TopKSAE

from spg_dist.errors import NoTokensError
from spg_dist.store import Store, codes, load_schema, sae_models, tokens, tokens_from_arrow, write_fragment
from spg_dist.store.tokens import TokenSelection

META = ("image_id", "dataset", "category", "split", "label")


@dataclass
class EncodeResult:
    sae_id: str
    images_encoded: int
    images_skipped: int
    atom_rows: int
    seconds: float
    top_n: int
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        return (f"{self.sae_id}: {self.images_encoded} images encoded ({self.images_skipped} already stored), "
                f"{self.atom_rows} atom_index rows, top-{self.top_n} per atom in atom_top, {self.seconds:.1f} s")


class SAEEncodeActor:
    """Holds one SAE; turns a batch of patch_tokens rows into sae_codes rows."""

    def __init__(self, weights: bytes, sae_id: str, device: str = "cpu"):
        import torch

        self.torch = torch
        self.sae = TopKSAE.from_bytes(weights).to(device).eval()
        self.sae_id, self.device = sae_id, device

    def __call__(self, batch: pa.Table) -> pa.Table:
        toks = tokens_from_arrow(batch)
        n, h, w, d = toks.shape
        with self.torch.no_grad():
            x = self.torch.from_numpy(np.ascontiguousarray(toks)).to(self.device)  # whole images: per-image steps
            values, indices = self.sae.encode(x)
            values, indices = values.reshape(n * h * w, -1), indices.reshape(n * h * w, -1)
        k = indices.shape[1]
        per = h * w * k
        offsets = pa.array(np.arange(n + 1, dtype=np.int64) * per)
        cols = {c: batch.column(c) for c in META}
        cols.update(sae_id=pa.array([self.sae_id] * n), grid_h=pa.array([h] * n, pa.int16()),
                    grid_w=pa.array([w] * n, pa.int16()), k=pa.array([k] * n, pa.int32()),
                    indices=pa.LargeListArray.from_arrays(offsets, pa.array(indices.cpu().numpy().astype(np.int32).ravel())),
                    values=pa.LargeListArray.from_arrays(offsets, pa.array(values.float().cpu().numpy().ravel())))
        return load_schema(codes.CODES).validate(pa.table(cols))


def atom_rows(rows: pa.Table) -> pa.Table:
    """``atom_index`` rows (non-zero activations) of ``sae_codes`` rows sharing one grid and k."""
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


def top_per_atom(atoms: np.ndarray, values: np.ndarray, n: int, image_ids: np.ndarray, patches: np.ndarray
                 ) -> np.ndarray:
    """Indices of the ``n`` largest values of each atom, grouped by atom, strongest first; ties broken by
    (image_id, patch) as the query side does, so atom_top equals a brute-force top-n exactly."""
    order = np.lexsort((patches, image_ids.astype(str), -values, atoms))
    a = atoms[order]
    starts = np.r_[0, np.flatnonzero(a[1:] != a[:-1]) + 1]
    rank = np.arange(len(a)) - np.repeat(starts, np.diff(np.r_[starts, len(a)]))
    return order[rank < n]


def write_codes_batch(rows: pa.Table, codes_uri: str, index_uri: str, top_n: int,
                      storage_options: dict | None = None) -> pa.Table:
    """Write a fragment of sae_codes and of atom_index; return the batch's top-N candidates per atom."""
    idx_rows = atom_rows(rows)
    frags = {codes.CODES: write_fragment(codes_uri, rows, load_schema(codes.CODES), storage_options),
             codes.INDEX: write_fragment(index_uri, idx_rows, load_schema(codes.INDEX), storage_options)}
    keep = _top(idx_rows, top_n)
    cand = idx_rows.take(pa.array(keep)).select(list(codes.TOP_SOURCE_COLUMNS))
    info = json.dumps({"fragments": frags, "images": rows.num_rows, "atom_rows": idx_rows.num_rows})
    return cand.append_column("info", pa.array([info] + [""] * (cand.num_rows - 1), pa.string()))


def encode(store: str | Store, sae_id: str, *, dataset: Sequence[str] | None = None,
           categories: Sequence[str] | None = None, top_n: int = 64, batch_size: int = 16, num_actors: int = 1,
           use_gpu: bool | None = None, commit_every_s: float = 30.0, address: str | None = None,
           num_cpus: int | None = None, progress: bool = True) -> EncodeResult:
    """Encode every stored token (of the SAE's backbone/layer, optionally filtered) with SAE ``sae_id``."""
    import lance_ray
    import ray

    from spg_dist.ray.runtime import cluster_gpus, ensure_ray
    from spg_dist.store.atoms import ensure_atom_indexes

    t0 = time.perf_counter()
    store = store if isinstance(store, Store) else Store(store)
    row = sae_models.get(store, sae_id)
    sel = TokenSelection.of(row["backbone"], row["layer"], dataset=list(dataset) if dataset else None,
                            category=list(categories) if categories else None)
    ids = tokens.require(store, sel, "tokens to encode", ["image_id", "dim"])
    want_dim = TopKSAE.from_bytes(row["weights"]).raw_dim
    dims = set(ids.column("dim").to_pylist())
    if dims != {want_dim}:
        raise NoTokensError(f"SAE {sae_id} reads tokens of dim {want_dim}, the store has {sorted(dims)} for "
                            f"{sel.describe()}")
    all_ids = set(ids.column("image_id").to_pylist())
    done = codes.encoded_image_ids(store, sae_id) & all_ids
    todo = sorted(all_ids - done)
    if todo:  # atom_index rows of images whose codes are missing (a crash between the two commits): drop them
        codes.drop_atoms(store, sae_id, None if not done else todo)
    result = EncodeResult(sae_id, 0, len(done), 0, 0.0, top_n)
    cand = pa.table({"atom": pa.array([], pa.int32()), "image_id": pa.array([], pa.string()),
                     "category": pa.array([], pa.string()), "patch": pa.array([], pa.int32()),
                     "value": pa.array([], pa.float32())})
    if todo:
        ensure_ray(address, num_cpus)
        gpu = (cluster_gpus() >= 1) if use_gpu is None else use_gpu
        flt = sel.where() if not done else TokenSelection.of(sel.backbone, sel.layer, image_ids=todo).where()
        ds = lance_ray.read_lance(tokens.lance_uri(store),
                                  columns=[*META, "grid_h", "grid_w", "dim", "tokens"], filter=flt,
                                  storage_options=store.storage_options)
        ds = ds.map_batches(SAEEncodeActor, fn_constructor_kwargs=dict(weights=row["weights"], sae_id=sae_id,
                                                                       device="cuda" if gpu else "cpu"),
                            batch_size=batch_size, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=num_actors),
                            **({"num_gpus": 1} if gpu else {"num_cpus": 1}))
        uris = codes.lance_uris(store)
        ds = ds.map_batches(write_codes_batch, fn_kwargs=dict(codes_uri=uris[codes.CODES],
                                                              index_uri=uris[codes.INDEX], top_n=top_n,
                                                              storage_options=store.storage_options),
                            batch_size=batch_size * 4, batch_format="pyarrow", num_cpus=0.5)
        pending: dict[str, list[str]] = {codes.CODES: [], codes.INDEX: []}
        last = time.monotonic()

        def commit() -> None:
            nonlocal last
            codes.commit(store, pending)  # atom_index first: see codes.commit
            pending[codes.INDEX], pending[codes.CODES], last = [], [], time.monotonic()

        bar = tqdm(total=len(todo), unit="img", desc=f"encode {sae_id}", disable=not progress)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for info in batch.column("info").to_pylist():
                    if info:
                        meta = json.loads(info)
                        for t, frags in meta["fragments"].items():
                            pending[t].extend(frags)
                        result.images_encoded += meta["images"]
                        result.atom_rows += meta["atom_rows"]
                        bar.update(meta["images"])
                cand = _reduce(pa.concat_tables([cand, batch.drop_columns(["info"])]), top_n)
                if time.monotonic() - last >= commit_every_s:
                    commit()
        finally:
            commit()
            bar.close()
    _write_atom_top(store, sae_id, cand, top_n)
    ensure_atom_indexes(store)
    result.seconds = time.perf_counter() - t0
    return result


def _top(t: pa.Table, top_n: int) -> np.ndarray:
    return top_per_atom(t.column("atom").to_numpy(), t.column("value").to_numpy(), top_n,
                        np.asarray(t.column("image_id").to_pylist(), dtype=object), t.column("patch").to_numpy())


def _reduce(cand: pa.Table, top_n: int) -> pa.Table:
    return cand.take(pa.array(_top(cand, top_n)))


def _write_atom_top(store: Store, sae_id: str, cand: pa.Table, top_n: int) -> None:
    """Merge this run's candidates with the stored top-N (the stored top-N is all a re-run needs)."""
    old = codes.read_top(store, sae_id)
    allc = pa.concat_tables([old.cast(cand.schema), cand]) if old.num_rows else cand
    if allc.num_rows == 0:
        return
    # an image re-encoded after a crash may sit in both: keep one entry per (atom, image, patch)
    allc = pa.Table.from_pandas(allc.to_pandas().drop_duplicates(["atom", "image_id", "patch"]),
                                schema=cand.schema, preserve_index=False)
    top = allc.take(pa.array(_top(allc, top_n)))
    atoms = top.column("atom").to_numpy()
    starts = np.r_[0, np.flatnonzero(atoms[1:] != atoms[:-1]) + 1]
    rank = np.arange(len(atoms)) - np.repeat(starts, np.diff(np.r_[starts, len(atoms)]))
    grid_w = codes.grid_w(store, sae_id)
    patch = top.column("patch").to_numpy()
    codes.upsert_top(store, pa.table({
        "sae_id": [sae_id] * top.num_rows, "atom": top.column("atom"), "rank": pa.array(rank, pa.int32()),
        "image_id": top.column("image_id"), "category": top.column("category"), "patch": top.column("patch"),
        "row": pa.array(patch // grid_w, pa.int16()), "col": pa.array(patch % grid_w, pa.int16()),
        "value": top.column("value")}))
