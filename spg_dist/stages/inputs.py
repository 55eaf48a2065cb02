"""What a detector asked for (:class:`~spg_dist.detectors.Inputs`), gathered from the store: target test tokens
per category, few-shot normal images, the unlabelled target set, a labelled auxiliary set with masks, paired
corrupted tokens, image files. Metadata and image/mask URIs are read once per source and reused; token bytes are
read per category, only for the layers the detector reads.

Shots are the first ``n`` normal *train* images of a category in ``image_id`` order: deterministic, and the same
images for every detector that asks for ``n`` shots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa

from spg_dist.data.imageio import load_mask
from spg_dist.detectors.base import TokenSet
from spg_dist.errors import MissingInputError, NoAuxiliaryDataError, NoTargetDataError, NoTokensError
from spg_dist.store import Store, images, tokens
from spg_dist.store.tokens import TokenSelection

MASK_SCALE = 4  # default mask side = token grid side x 4 (the resolution the demo's evaluation used so far)


def decode_png_mask(data: bytes) -> np.ndarray:
    """A stored mask PNG -> uint8 {0, 1}."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return (np.asarray(im.convert("L")) > 0).astype(np.uint8)


def load_native_masks(image_ids: Sequence[str], uris: dict[str, tuple[str, str]],
                      sizes: dict[str, tuple[int, int]]) -> list[np.ndarray]:
    """Masks at each image's own resolution (full-resolution ground truth); all-normal where there is none."""
    out = []
    for image_id in image_ids:
        mask_uri = uris.get(image_id, ("", ""))[1]
        if mask_uri:
            out.append(load_mask(mask_uri))
        else:
            h, w = sizes[image_id]
            out.append(np.zeros((int(h), int(w)), np.uint8))
    return out


def load_masks(image_ids: Sequence[str], uris: dict[str, tuple[str, str]], size: int) -> np.ndarray:
    """[N, size, size] uint8 masks; an image without a mask is all-normal (its ``images`` row says so)."""
    out = np.zeros((len(image_ids), size, size), np.uint8)
    for i, image_id in enumerate(image_ids):
        mask_uri = uris.get(image_id, ("", ""))[1]
        if mask_uri:
            out[i] = load_mask(mask_uri, size)
    return out


@dataclass
class InputSource:
    """The store-side half of a detector run: one backbone, the layers it reads, a target and optional aux data."""

    store: Store
    backbone: str
    layers: list[int]  # stored layers to read; negative ones count from the deepest the target has
    target: str
    aux: list[str] | None = None
    _meta: dict[str, pa.Table] = field(default_factory=dict, repr=False)
    _uris: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if any(layer < 0 for layer in self.layers):
            self.layers = self._resolve(self.layers)

    def _resolve(self, layers: list[int]) -> list[int]:
        """Negative layers from the target's stored layers, with the one metadata read the target needs anyway."""
        every_layer = TokenSelection.of(self.backbone, None, dataset=self.target, split="test")
        t = tokens.scan(self.store, every_layer, list(tokens.META_COLUMNS))
        stored = sorted({int(v) for v in t.column("layer").to_pylist()})
        if not stored:
            raise NoTargetDataError(f"no test-split {self.backbone} tokens of target dataset {self.target!r} in "
                                    f"{self.store.uri}; the store holds {tokens.describe_inventory(self.store)} "
                                    f"(run `spg extract` on it first)")
        out = []
        for layer in layers:
            if layer >= 0:
                out.append(layer)
            elif -layer <= len(stored):
                out.append(stored[layer])
            else:
                raise NoTokensError(f"layer {layer}: {self.backbone} has only layers {stored} stored for "
                                    f"{self.target}; run `spg extract --layers ...` with more layers")
        first = pa.compute.equal(t.column("layer"), out[0])
        self._meta[f"{self.target}|test"] = t.filter(first).sort_by("image_id")
        return out

    # ----------------------------------------------------------------------------------------- metadata
    def meta(self, dataset: str, split: str | None) -> pa.Table:
        """Token metadata of a dataset (first layer), read once per (dataset, split)."""
        key = f"{dataset}|{split}"
        if key not in self._meta:
            if self.layers:
                sel = TokenSelection.of(self.backbone, self.layers[0], dataset=dataset, split=split)
                self._meta[key] = tokens.metadata(self.store, sel)
            else:  # a detector that reads pixels only: the images table is its index
                t = images.rows(self.store, dataset=dataset)
                if split:
                    t = t.filter(pa.compute.equal(t.column("split"), split))
                self._meta[key] = t.sort_by("image_id")
        return self._meta[key]

    def uris(self, dataset: str) -> dict[str, tuple[str, str]]:
        if dataset not in self._uris:
            self._uris[dataset] = images.uris(self.store, dataset)
        return self._uris[dataset]

    def sizes(self, dataset: str) -> dict[str, tuple[int, int]]:
        """``{image_id: (height, width)}`` of the original files (what native-resolution evaluation compares at)."""
        t = images.rows(self.store, dataset=dataset, columns=("image_id", "width", "height"))
        return dict(zip(t.column("image_id").to_pylist(),
                        zip(t.column("height").to_pylist(), t.column("width").to_pylist())))

    def target_meta(self) -> pa.Table:
        meta = self.meta(self.target, "test")
        if meta.num_rows == 0:
            what = f"{self.backbone} layer {self.layers[0]}" if self.layers else "image files"
            raise NoTargetDataError(f"no test-split {what} of target dataset {self.target!r} in {self.store.uri}; "
                                    f"the store holds {tokens.describe_inventory(self.store)} (run `spg extract` "
                                    f"on it first)")
        return meta

    def categories(self) -> list[str]:
        return sorted(set(self.target_meta().column("category").to_pylist()))

    def grid(self) -> tuple[int, int]:
        return tokens.grid_of(self.target_meta(), f"test tokens of {self.target}")

    def image_size(self) -> int:
        sizes = set(self.target_meta().column("image_size").to_pylist()) if "image_size" in \
            self.target_meta().column_names else set()
        return int(max(sizes)) if sizes else 0

    # ----------------------------------------------------------------------------------------- token sets
    def _token_set(self, dataset: str, meta: pa.Table, labels: np.ndarray | None = None,
                   mask_size: int | None = None, with_uris: bool = False) -> TokenSet:
        ids = meta.column("image_id").to_pylist()
        toks: dict[int, np.ndarray] = {}
        for layer in self.layers:
            sel = TokenSelection.of(self.backbone, layer, dataset=dataset, image_ids=ids)
            m, t = tokens.load_tokens(self.store, sel)
            if m.column("image_id").to_pylist() != ids:
                missing = sorted(set(ids) - set(m.column("image_id").to_pylist()))
                raise NoTokensError(f"{len(missing)} image(s) of {dataset} have no {self.backbone} layer {layer} "
                                    f"tokens (e.g. {missing[:2]}); run `spg extract --layers "
                                    f"{','.join(map(str, self.layers))}` on {dataset}")
            toks[layer] = t
        uris = self.uris(dataset) if (mask_size or with_uris) else {}
        lab = np.asarray(meta.column("label").to_pylist(), np.int8) if labels is None else labels
        return TokenSet(toks, ids, meta.column("category").to_pylist(), lab,
                        masks=load_masks(ids, uris, mask_size) if mask_size else None,
                        image_uris=[uris.get(i, ("", ""))[0] for i in ids] if with_uris else None)

    def test_set(self, category: str, with_uris: bool = False) -> TokenSet:
        meta = self.target_meta()
        rows = meta.filter(pa.compute.equal(meta.column("category"), category))
        return self._token_set(self.target, rows, with_uris=with_uris)

    def unlabelled(self, category: str) -> TokenSet:
        """The category's test images with labels hidden (-1): what a transductive detector may see."""
        ts = self.test_set(category)
        ts.labels = np.full(len(ts), -1, np.int8)
        return ts

    def shots(self, categories: Sequence[str], n: int, with_uris: bool = False) -> TokenSet:
        """The first ``n`` normal train images of each category (image_id order)."""
        meta = self.meta(self.target, "train")
        parts = []
        for cat in categories:
            rows = meta.filter(pa.compute.and_(pa.compute.equal(meta.column("category"), cat),
                                               pa.compute.equal(meta.column("label"), 0)))
            if rows.num_rows == 0:
                raise MissingInputError(f"no normal train images of category {cat!r} in {self.target} for few-shot "
                                        f"fitting; extract its train split (`spg extract`) or use a zero-shot method")
            if rows.num_rows < n:
                raise MissingInputError(f"category {cat!r} of {self.target} has {rows.num_rows} normal train "
                                        f"image(s); {n} shots asked for: lower --shots")
            parts.append(rows.slice(0, n))
        return self._token_set(self.target, pa.concat_tables(parts), with_uris=with_uris)

    def aux_set(self, mask_size: int | None, with_tokens: bool = True) -> TokenSet:
        """Every image of the auxiliary dataset(s) (all splits) with labels and masks at ``mask_size``."""
        if not self.aux:
            raise MissingInputError("this method trains on a labelled auxiliary dataset: pass --aux DATASET")
        parts, sets = [], []
        for ds in self.aux:
            meta = self.meta(ds, None)
            if meta.num_rows == 0:
                raise NoAuxiliaryDataError(f"no {self.backbone} tokens of auxiliary dataset {ds!r} in "
                                           f"{self.store.uri}; the store holds {tokens.describe_inventory(self.store)}")
            parts.append(meta)
        size = int(mask_size or (MASK_SCALE * max(self._grid(parts[0])) if with_tokens else 256))
        for ds, meta in zip(self.aux, parts):
            if with_tokens:
                sets.append(self._token_set(ds, meta, mask_size=size, with_uris=True))
            else:
                ids = meta.column("image_id").to_pylist()
                uris = self.uris(ds)
                sets.append(TokenSet({}, ids, meta.column("category").to_pylist(),
                                     np.asarray(meta.column("label").to_pylist(), np.int8),
                                     masks=load_masks(ids, uris, size), image_uris=[uris[i][0] for i in ids]))
        out = sets[0] if len(sets) == 1 else _concat(sets)
        if not ((out.labels == 1) & out.masks.reshape(len(out), -1).any(1)).any():
            raise NoAuxiliaryDataError(f"auxiliary dataset(s) {'+'.join(self.aux)} have no anomalous image with a "
                                       f"non-empty mask ({len(out)} images); this method needs pixel labels")
        return out

    def corrupted(self, shots: TokenSet) -> TokenSet:
        """Tokens of the stored corrupted copies of ``shots`` (``spg extract --corruptions N``), paired with them."""
        meta = tokens.corrupted_metadata(self.store, self.backbone, self.layers[0], shots.image_ids)
        if meta.num_rows == 0:
            raise MissingInputError(f"no corrupted copies of the {len(shots)} shot images of {self.target} in the "
                                    f"store; run `spg extract --dataset ... --corruptions 4` on {self.target} first")
        ids = meta.column("image_id").to_pylist()
        toks = {layer: tokens.load_tokens(self.store, TokenSelection.of(self.backbone, layer, image_ids=ids,
                                                                        sources=shots.image_ids))[1]
                for layer in self.layers}
        pngs = images.corruption_masks(self.store, ids)
        masks = np.stack([decode_png_mask(pngs[i]) for i in ids]) if len(pngs) == len(ids) else None
        return TokenSet(toks, ids, meta.column("category").to_pylist(), np.ones(len(ids), np.int8), masks=masks,
                        source_ids=meta.column("source_image_id").to_pylist(), clean=shots)

    def _grid(self, meta: pa.Table) -> tuple[int, int]:
        return tokens.grid_of(meta) if "grid_h" in meta.column_names else self.grid()


def _concat(sets: list[TokenSet]) -> TokenSet:
    return TokenSet({k: np.concatenate([s.tokens[k] for s in sets]) for k in sets[0].tokens},
                    [i for s in sets for i in s.image_ids], [c for s in sets for c in s.categories],
                    np.concatenate([s.labels for s in sets]),
                    masks=np.concatenate([s.masks for s in sets]) if sets[0].masks is not None else None,
                    image_uris=[u for s in sets for u in (s.image_uris or [])] or None)


__all__ = ["InputSource", "MASK_SCALE", "load_masks", "load_native_masks"]
