"""``spg encode``: SAE codes for every stored token of a dataset, through a Ray Data actor pool, then the atom
tables derived from them.

patch_tokens (read by Ray Data from the store) -> SAE actors (codes per image) -> writer tasks (one uncommitted
``sae_codes`` fragment each) -> driver: commits the fragments every ``commit_every_s`` (each (sae_id, image_id)
stored once, also against a concurrent encode of the same SAE), then (re)builds ``atom_images`` and ``atom_top``
from *all* of the SAE's sae_codes with :func:`spg_dist.store.codes.build_atoms`. The derived tables are a pure
function of sae_codes, rebuilt and replaced atomically, never merged, so an encode killed between commits, or two
encodes racing, cannot leave them short: the next run (even one with nothing left to encode) rebuilds them when
their fingerprint differs from sae_codes'. Encoding is separate from training: a sweep that only trains never
pays for it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from spg_dist.sae import TopKSAE

from spg_dist.errors import NoTokensError
from spg_dist.ray.replan import ACTOR_ARGS, MAX_REPLANS, actor_args_allowed, alive_nodes, node_lost, note_replan, settle
from spg_dist.store import Store, codes, load_schema, sae_models, tokens, tokens_from_arrow, write_fragment
from spg_dist.store.tokens import TokenSelection

META = ("image_id", "dataset", "category", "split", "label")


@dataclass
class EncodeResult:
    sae_id: str
    images_encoded: int
    images_skipped: int
    activations: int                      # firings (value > 0) in the codes this run committed
    seconds: float
    top_n: int
    build: codes.BuildResult | None = None
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        out = (f"{self.sae_id}: {self.images_encoded} images encoded ({self.images_skipped} already stored, "
               f"{self.activations:,} activations), {self.seconds:.1f} s")
        return out + (f"\n{self.build.summary()}" if self.build else "")


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
            x = self.torch.from_numpy(np.require(toks, requirements=["C", "W"])).to(self.device)  # whole images: per-image steps
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


def write_codes_batch(rows: pa.Table, codes_uri: str, storage_options: dict | None = None) -> pa.Table:
    """Write one uncommitted sae_codes fragment; return its description (one row) for the driver to commit."""
    frags = write_fragment(codes_uri, rows, load_schema(codes.CODES), storage_options)
    fired = int((codes.flat_codes(rows)[1] > 0).sum()) if rows.num_rows else 0
    return pa.table({"info": [json.dumps({"fragments": frags, "images": rows.num_rows, "activations": fired})]})


def encode(store: str | Store, sae_id: str, *, dataset: Sequence[str] | None = None,
           categories: Sequence[str] | None = None, top_n: int = codes.DEFAULT_TOP_N, batch_size: int = 16,
           num_actors: int = 1, use_gpu: bool | None = None, commit_every_s: float = 30.0,
           rebuild_atoms: bool = False, address: str | None = None, num_cpus: int | None = None,
           progress: bool = True, hook: Callable[[str], None] | None = None,
           on_images: Callable[[int], None] | None = None) -> EncodeResult:
    """Encode every stored token (of the SAE's backbone/layer, optionally filtered) with SAE ``sae_id`` that has
    no sae_codes row yet, then bring atom_images / atom_top up to date with all of the SAE's sae_codes (top
    ``top_n`` per atom and scope; ``rebuild_atoms`` rebuilds them even when current). ``hook("committed")``
    runs after each sae_codes commit (fault injection in tests); ``on_images(n)`` after every n images encoded.

    Nothing left to encode: no Ray is started (the atom tables are still brought up to date). Interrupted (Ctrl-C,
    a failed task): the sae_codes fragments already written are committed before the exception propagates, and
    the atom tables, rebuilt from all of the SAE's codes by the next run, are never left short."""
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
    result = EncodeResult(sae_id, 0, len(done), 0, 0.0, top_n)
    for replan in range(MAX_REPLANS + 1):
        if not todo:
            break
        from spg_dist.ray.runtime import ensure_ray

        ensure_ray(address, num_cpus)
        alive = alive_nodes()  # before this run: the count a lost node lowers
        try:
            _encode_images(store, sae_id, row, sel, todo, bool(done), result, batch_size=batch_size,
                           num_actors=num_actors, use_gpu=use_gpu, commit_every_s=commit_every_s, address=address,
                           num_cpus=num_cpus, progress=progress, hook=hook, on_images=on_images)
            break
        except Exception as e:  # a lost node: what was written is committed; encode what is left on the nodes alive
            if not node_lost(e) or replan == MAX_REPLANS:
                raise
            settle(alive)
            done = codes.encoded_image_ids(store, sae_id) & all_ids
            todo = sorted(all_ids - done)
            note_replan(f"encode {sae_id}", e, len(todo), replan + 1)
    result.build = codes.build_atoms(store, sae_id, top_n=top_n, force=rebuild_atoms, C=row.get("C"))
    result.seconds = time.perf_counter() - t0
    return result


def _encode_images(store: Store, sae_id: str, row: dict, sel: TokenSelection, todo: list[str], partial: bool,
                   result: EncodeResult, *, batch_size: int, num_actors: int, use_gpu: bool | None,
                   commit_every_s: float, address: str | None, num_cpus: int | None, progress: bool,
                   hook: Callable[[str], None] | None, on_images: Callable[[int], None] | None = None) -> None:
    import lance_ray
    import ray

    from spg_dist.ray.runtime import cluster_gpus, ensure_ray

    ensure_ray(address, num_cpus)
    gpu = (cluster_gpus() >= 1) if use_gpu is None else use_gpu
    flt = sel.where() if not partial else TokenSelection.of(sel.backbone, sel.layer, image_ids=todo).where()
    ds = lance_ray.read_lance(tokens.lance_uri(store), columns=[*META, "grid_h", "grid_w", "dim", "tokens"],
                              filter=flt, storage_options=store.storage_options)
    with actor_args_allowed():
        ds = ds.map_batches(SAEEncodeActor, fn_constructor_kwargs=dict(weights=row["weights"], sae_id=sae_id,
                                                                       device="cuda" if gpu else "cpu"),
                            batch_size=batch_size, batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(size=num_actors), **ACTOR_ARGS,
                            **({"num_gpus": 1} if gpu else {"num_cpus": 1}))
    ds = ds.map_batches(write_codes_batch, fn_kwargs=dict(codes_uri=codes.lance_uri(store),
                                                          storage_options=store.storage_options),
                        batch_size=batch_size * 4, batch_format="pyarrow", num_cpus=0.5)
    pending: list[str] = []
    last = time.monotonic()

    def commit() -> None:
        nonlocal pending, last
        if pending:
            codes.commit(store, pending)
            pending, last = [], time.monotonic()
            if hook:
                hook("committed")

    bar = tqdm(total=len(todo), unit="img", desc=f"encode {sae_id}", disable=not progress)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for info in batch.column("info").to_pylist():
                meta = json.loads(info)
                pending.extend(meta["fragments"])
                result.images_encoded += meta["images"]
                result.activations += meta["activations"]
                bar.update(meta["images"])
                if on_images:
                    on_images(meta["images"])
            if time.monotonic() - last >= commit_every_s:
                commit()
    finally:
        try:
            commit()  # on Ctrl-C or a failed task too: the codes already written are kept, a re-run does the rest
        finally:
            bar.close()


__all__ = ["EncodeResult", "SAEEncodeActor", "encode", "write_codes_batch"]
