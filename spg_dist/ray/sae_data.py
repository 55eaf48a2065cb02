"""How stored tokens reach the SAE trainer: a worker's shard held in (device) memory when it fits,
streamed through Ray Data with a local shuffle buffer when it does not.

Shards are assigned by a stable hash of ``image_id``, so every worker sees whole images and the same images
on every run and every resume.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

import pyarrow as pa
import pyarrow.compute as pc

from spg_dist.errors import NoTokensError
from spg_dist.sae.preprocess import Preprocessing
from spg_dist.store import Store, tokens
from spg_dist.store.tokens import TokenSelection, flat_values




@dataclass(frozen=True)
class TokenStats:
    images: int
    tokens: int
    dim: int

    @property
    def nbytes(self) -> int:
        return self.tokens * self.dim * 2


def token_stats(meta: pa.Table, flt: TokenSelection) -> TokenStats:
    """Counts from metadata rows (``tokens.require``: no token bytes read)."""
    dims = set(meta.column("dim").to_pylist())
    if len(dims) != 1:
        raise NoTokensError(f"tokens for {flt.describe()} have several dims {sorted(dims)}; filter further")
    n = int(np.sum(np.asarray(meta.column("grid_h"), dtype=np.int64) * np.asarray(meta.column("grid_w"), dtype=np.int64)))
    return TokenStats(meta.num_rows, n, dims.pop())


def owner(image_id: str, world: int) -> int:
    return zlib.crc32(image_id.encode()) % world


def _read_shard(store: Store, flt: TokenSelection, rank: int, world: int) -> tuple[torch.Tensor, np.ndarray]:
    """This worker's raw fp16 tokens ``[N, d]`` (whole images, assigned by ``owner``) and tokens per image.

    One multi-threaded Lance scan and one flatten: per-batch Python work cost 3x the read itself.
    """
    tbl = tokens.scan(store, flt, ["image_id", "tokens", "dim", "grid_h", "grid_w"])
    # The store's row order is the order Ray Data's writers happened to finish in (preserve_order is off), so it
    # differs from run to run; the shuffle, the init sample and the preprocessing fit index rows by position: put
    # them in image_id order first, so a seed gives the same SAE whatever order the rows were written in.
    ids = tbl.column("image_id")
    order = pc.sort_indices(ids)
    if not pc.all(pc.equal(order, pa.array(np.arange(len(ids), dtype=np.uint64)))).as_py():
        tbl = tbl.take(order)
    if world > 1:
        mine = [owner(i, world) == rank for i in tbl.column("image_id").to_pylist()]
        tbl = tbl.filter(pa.array(mine))
    if tbl.num_rows == 0:
        return torch.zeros((0, 0), dtype=torch.float16), np.zeros(0, dtype=np.int64)
    d = int(tbl.column("dim")[0].as_py())
    counts = np.asarray(tbl.column("grid_h"), dtype=np.int64) * np.asarray(tbl.column("grid_w"), dtype=np.int64)
    values = flat_values(tbl.column("tokens"))  # zero-copy for a lone chunk
    with warnings.catch_warnings():  # Arrow buffers are read-only; the trainer only ever reads (gathers) them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(values.reshape(-1, d)), counts


def preprocess_images(tokens: torch.Tensor, counts: np.ndarray, preprocessing: Preprocessing,
                      chunk_images: int = 256) -> torch.Tensor:
    """Raw tokens ``[N, d]`` of whole images (``counts[i]`` tokens for image i, in order) -> fp16 ``[N, d_out]``
    through ``preprocessing``, applied to whole images (so per-image steps see their image), in chunks of
    images so the float32 intermediate stays small. fp16 keeps the shard's memory as budgeted (the stored
    tokens are fp16 already; preprocessed values are O(1))."""
    d_out = preprocessing.out_dim(tokens.shape[-1])
    out = torch.empty((tokens.shape[0], d_out), dtype=torch.float16, device=tokens.device)
    starts = np.concatenate([[0], np.cumsum(counts)])
    i = 0
    while i < len(counts):
        j = i + 1  # a run of images with the same token count, at most chunk_images long
        while j < len(counts) and j - i < chunk_images and counts[j] == counts[i]:
            j += 1
        a, b = int(starts[i]), int(starts[j])
        x = tokens[a:b].reshape(j - i, int(counts[i]), -1)
        out[a:b] = preprocessing.apply(x).reshape(b - a, d_out).to(torch.float16)
        i = j
    return out


def load_shard(store: Store, flt: TokenSelection, rank: int = 0, world: int = 1,
               preprocessing: Preprocessing | None = None) -> torch.Tensor:
    """This worker's tokens as one fp16 ``[N, d]`` tensor (whole images, assigned by ``owner``): raw, or with
    ``preprocessing`` already applied per image (``[N, d_out]``), ready for ``step(preprocessed=True)``."""
    tokens, counts = _read_shard(store, flt, rank, world)
    if preprocessing is None or preprocessing.is_identity or tokens.numel() == 0:
        return tokens  # zero-copy view of the Arrow buffer; identity only casts, which the step does anyway
    return preprocess_images(tokens, counts, preprocessing)


def load_images(store: Store, flt: TokenSelection, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Raw tokens grouped by image, fp16 ``[B, P, d]`` (what per-image preprocessing steps are fitted on).
    Raises when the images have different token grids (filter to one resolution)."""
    tokens, counts = _read_shard(store, flt, rank, world)
    if len(set(counts.tolist())) > 1:
        raise NoTokensError(f"tokens for {flt.where()} come in several grid sizes ({sorted(set(counts.tolist()))} "
                            "patches per image); filter to one resolution")
    return tokens.reshape(len(counts), int(counts[0]) if len(counts) else 0, -1)


def memory_batches(tokens: torch.Tensor, batch_tokens: int, epoch: int, seed: int, start: int = 0
                   ) -> Iterator[torch.Tensor]:
    """Seeded shuffle per epoch, on the tokens' device; ``start`` skips batches already done (exact resume)."""
    g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(tokens.shape[0], generator=g).to(tokens.device)
    for b in range(start, tokens.shape[0] // batch_tokens):
        yield tokens[order[b * batch_tokens:(b + 1) * batch_tokens]]


def stream_dataset(store: Store, flt: TokenSelection, preprocessing: Preprocessing | None = None):
    """A Ray Dataset of single tokens {"x": fp16[d]} read from the store (for shards larger than memory); with
    ``preprocessing`` they are already through it, applied per image before the tokens are split up."""
    import lance_ray

    if preprocessing is not None and preprocessing.is_identity:
        preprocessing = None  # identity: keep the read tasks free of torch

    def explode(batch):
        d = int(batch["dim"][0])
        flat = np.concatenate([np.asarray(t, dtype=np.float16) for t in batch["tokens"]])
        if preprocessing is None:
            return {"x": flat.reshape(-1, d)}
        counts = np.asarray(batch["grid_h"], dtype=np.int64) * np.asarray(batch["grid_w"], dtype=np.int64)
        return {"x": preprocess_images(torch.from_numpy(flat.reshape(-1, d)), counts, preprocessing).numpy()}

    ds = lance_ray.read_lance(tokens.lance_uri(store), columns=["tokens", "dim", "grid_h", "grid_w"],
                              filter=flt.where(), storage_options=store.storage_options)
    return ds.map_batches(explode, batch_format="numpy", batch_size=16)
