"""The three stages of the extraction pipeline, each a Ray Data UDF over Arrow/NumPy batches.

decode (CPU tasks) -> encode (a pool of backbone actors, GPU when present) -> write fragments (CPU tasks).
Errors travel with the data as rows whose ``error`` column is set, so one bad file never fails a batch; the
writer drops them from the fragment and reports them to the driver, which records them in ``errors``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spg_dist.data.imageio import ImageDecodeError, check_mask, load_image_and_size, resolve_max_pixels
from spg_dist.data.records import outside_root_message, outside_root_path, printable

RECORD_COLUMNS = ("image_id", "dataset", "category", "split", "label", "defect_type", "image_uri", "mask_uri")
# A corrupted copy of a normal image (FoundAD's pairs) is a record with its source and the index j of the copy.
ITEM_COLUMNS = (*RECORD_COLUMNS, "source_image_id", "corruption")
# Columns that flow from decode to the writer next to the pixels/tokens.
PASS_COLUMNS = (*ITEM_COLUMNS, "width", "height", "error_stage", "error", "mask_error", "corruption_png")


def _png(mask: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((mask > 0).astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def _one_line(what: str, uri: str, e: BaseException) -> str:
    """A last-resort message for an exception no decoder anticipated (it must still be one ``errors`` line)."""
    return f"cannot decode {what} {printable(uri)}: {type(e).__name__}: {' '.join(str(e).split())}"


def decode_batch(batch: dict[str, np.ndarray], image_size: int, resample: str = "bicubic",
                 max_pixels: int | None = None) -> dict[str, np.ndarray]:
    """Records -> resized uint8 pixels [n, S, S, 3] plus width/height; failures become error rows. A corrupted copy
    (``corruption`` j > 0) is its source image, resized, then CutPaste-corrupted with a seed fixed by (source, j),
    so every run and every backbone sees the same pixels; its mask travels along as a PNG.

    One file never fails the batch; each problem becomes one row of ``errors`` (one line of text naming the file):

    - stage ``path``: the dataset file placed the image outside the dataset root (URI ``outside-root:...``); it is
      never opened and the text is the same whether or not that file exists;
    - stage ``decode`` (image skipped): missing, not a regular file, not a supported raster format, corrupt or
      truncated, over the pixel limit (``max_pixels``; None: ``$SPG_MAX_IMAGE_PIXELS``, else
      ``spg_dist.data.imageio.MAX_PIXELS`` = 64 MP, checked on the header before any pixel is decoded), a
      decompression bomb, or any other exception while reading it;
    - ``mask_error`` (the driver writes stage ``mask``; the image's tokens are kept): an anomalous image without a
      mask, a mask that is missing, outside the root, unreadable or over the limit, a mask whose size is not its
      image's (never stretched), or an all-zero mask on an image labelled anomalous. Such a mask is dropped: the
      row's ``mask_uri`` becomes ``""``, exactly like a missing mask, so no later stage reads a mask known bad.

    A ``max_pixels`` that is not a positive integer (or a bad ``$SPG_MAX_IMAGE_PIXELS``) fails the batch once, in
    one line: it is a setting, not a bad file.
    """
    from spg_dist.data.corruptions import corruption_seed, cutpaste

    limit = resolve_max_pixels(max_pixels)
    n = len(batch["image_id"])
    pixels = np.zeros((n, image_size, image_size, 3), np.uint8)
    out: dict[str, Any] = {k: batch[k] for k in ITEM_COLUMNS}
    width, height = np.zeros(n, np.int32), np.zeros(n, np.int32)
    stage, error, mask_error, pngs = [""] * n, [""] * n, [""] * n, [b""] * n
    mask_uris = [str(u) for u in batch["mask_uri"]]
    for i in range(n):
        uri = str(batch["image_uri"][i])
        raw = outside_root_path(uri)
        if raw is not None:  # refused by the reader: never opened, not even stat'ed
            stage[i], error[i] = "path", outside_root_message("image", raw)
            continue
        try:
            pixels[i], (width[i], height[i]) = load_image_and_size(uri, image_size, resample, limit)
        except ImageDecodeError as e:
            stage[i], error[i] = "decode", str(e)
            continue
        except Exception as e:  # noqa: BLE001 - whatever one hostile file raises, the rest of the batch goes on
            stage[i], error[i] = "decode", _one_line("image", uri, e)
            continue
        j = int(batch["corruption"][i])
        if j > 0:
            rng = np.random.default_rng(corruption_seed(str(batch["source_image_id"][i]), j))
            pixels[i], mask = cutpaste(pixels[i], rng)
            pngs[i] = _png(mask)
            continue
        mask_uri, label = mask_uris[i], int(batch["label"][i])
        if label == 1 and not mask_uri:
            mask_error[i] = f"{uri}: anomalous image has no mask; add one or it cannot be used for pixel metrics"
        elif mask_uri:
            try:
                check_mask(mask_uri, (int(width[i]), int(height[i])), anomalous=label == 1, max_pixels=limit)
            except ImageDecodeError as e:
                mask_error[i] = str(e)
            except Exception as e:  # noqa: BLE001
                mask_error[i] = _one_line("mask", mask_uri, e)
            if mask_error[i]:
                mask_uris[i] = ""
    out.update(pixels=pixels, width=width, height=height, error_stage=np.array(stage, dtype=object),
               error=np.array(error, dtype=object), mask_error=np.array(mask_error, dtype=object),
               corruption_png=np.array(pngs, dtype=object), mask_uri=np.array(mask_uris, dtype=object))
    return out


class EncodeActor:
    """Holds one frozen backbone for its lifetime; turns pixel batches into Arrow rows of patch tokens."""

    def __init__(self, backbone: str, weights: str | None, layers: list[int], image_size: int,
                 backbone_id: str, device: str = "cpu", torch_threads: int | None = None, token: str = "block"):
        import torch

        from spg_dist.backbones import create_backbone

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.torch = torch
        self.model = create_backbone(backbone, weights=weights, device=device, image_size=image_size)
        self.layers = self.model.resolve_layers(layers)
        self.backbone_id, self.image_size, self.token = backbone_id, image_size, token
        self.weights = weights or (self.model.config.source if not self.model.config.untrained else "random-init")

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        n_ok, n = int(ok.sum()), len(ok)
        grids: dict[int, np.ndarray] = {}
        if n_ok:
            pixels = self.torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            if self.model.device.type == "cuda":
                pixels = pixels.pin_memory()
            out = self.model.encode(pixels, self.layers, token=self.token) if self.token != "block" else \
                self.model.encode(pixels, self.layers)
            grids = {layer: t.to(self.torch.float16).cpu().numpy() for layer, t in out.items()}
        tables = []
        for layer in self.layers:
            tokens = grids.get(layer)
            h, w, d = tokens.shape[1:] if tokens is not None else (0, 0, 0)
            per_row = h * w * d
            lengths = np.where(ok, per_row, 0).astype(np.int64)
            offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]))
            values = pa.array(tokens.reshape(-1) if tokens is not None else np.zeros(0, np.float16), pa.float16())
            cols = {k: batch[k] for k in PASS_COLUMNS}
            cols.update(backbone=[self.backbone_id] * n, layer=np.full(n, layer, np.int16), token=[self.token] * n,
                        image_size=np.full(n, self.image_size, np.int32),
                        grid_h=np.where(ok, h, 0).astype(np.int16), grid_w=np.where(ok, w, 0).astype(np.int16),
                        dim=np.where(ok, d, 0).astype(np.int32),
                        tokens=pa.LargeListArray.from_arrays(offsets, values), weights=[self.weights] * n)
            tables.append(pa.table({k: (list(v) if isinstance(v, np.ndarray) and v.dtype == object else v)
                                    for k, v in cols.items()}))
        return pa.concat_tables(tables)


def write_fragment_batch(batch: pa.Table, lance_uri: str, skip: frozenset = frozenset(),
                         storage_options: dict[str, str] | None = None) -> pa.Table:
    """Write the good rows of a batch as one uncommitted Lance fragment; return what the driver needs.

    The returned table has one small row per input row (metadata, error, ``written``) and, on its first row,
    the JSON of the written fragments, the token bytes and the write time.
    """
    import datetime as dt

    from spg_dist.store import load_schema, tokens, write_fragment

    schema = load_schema(tokens.TABLE)
    good = pc.equal(batch.column("error"), "")
    if skip:  # (image, layer) pairs a previous run already stored: never write them twice
        keys = zip(batch.column("image_id").to_pylist(), batch.column("layer").to_pylist())
        good = pc.and_(good, pa.array([(k, int(l)) not in skip for k, l in keys]))
    rows = batch.filter(good)
    t0 = time.perf_counter()
    fragments: list[str] = []
    token_bytes = 0
    if rows.num_rows:
        now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        rows = rows.append_column("created_at", pa.array([now] * rows.num_rows, pa.timestamp("us")))
        fragments = write_fragment(lance_uri, rows.select(schema.arrow.names), schema, storage_options)
        token_bytes = 2 * int(pc.sum(pc.list_value_length(rows.column("tokens"))).as_py() or 0)
    n = batch.num_rows
    report = batch.select([*PASS_COLUMNS, "layer"]).append_column("written", good)
    extra = json.dumps({"fragments": fragments, "bytes": token_bytes, "seconds": time.perf_counter() - t0})
    return report.append_column("fragments", pa.array([extra] + [""] * (n - 1), pa.string()))
