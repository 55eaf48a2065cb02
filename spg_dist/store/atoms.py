"""Atom queries: which patches an SAE atom fires on, in which images, where in an image, and how it spreads over
categories.

Three tables answer them (see :mod:`.codes` for how the two derived ones are built and kept exact):

* ``atom_top`` — per (SAE, scope, atom) the top-N activations, scope "" over every category or one category:
  "the strongest patches of atom a [within category c]" is one indexed lookup (BTree on atom, Bitmap on sae_id
  and scope) however large the store grows;
* ``atom_images`` — per (SAE, atom, image) the atom fires in: count, sum, max and argmax patch. "Which images fire
  atom a" is one indexed lookup, the per-atom statistics are sums over its rows, and a top-n for n larger than
  atom_top's N reads only the images that can hold it;
* ``sae_codes`` — the ground truth both are derived from, used for activation maps and for
  :func:`brute_force_top`, the reference the indexed paths are checked against (tests, ``--verify``).

Rows of a derived table built from another set of encoded images than sae_codes holds now (an encode running or
interrupted) are refused with one clear error, never returned silently. Top-patch order everywhere: value
descending, then image_id, then patch ascending, so every path agrees even on ties. No Ray, no torch: this runs
in the CLI process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from spg_dist.store import codes, sae_models
from spg_dist.store.codes import ALL, CODES, IMAGES, TOP, ensure_atom_indexes
from spg_dist.store.connection import Store, StoreError
from spg_dist.store.filters import where

TOP_COLUMNS = ("rank", "image_id", "category", "patch", "row", "col", "value")
IMAGE_COLUMNS = ("image_id", "category", "split", "label", "count", "sum_value", "max_value", "max_patch", "row",
                 "col")
_ORDER = [("value", "descending"), ("image_id", "ascending"), ("patch", "ascending")]


class AtomQueryError(StoreError, LookupError):
    """An atom query that cannot be answered (unknown SAE, atom out of range, unknown category, derived tables
    missing or stale); one line."""


@dataclass(frozen=True)
class SaeInfo:
    """What atom queries need to know about one encoded SAE, from one cheap scan of sae_codes' scalars."""
    sae_id: str
    grid_h: int
    grid_w: int
    k: int
    C: int | None                         # dictionary size from sae_models; None when the SAE is unregistered
    backbone: str | None
    layer: int | None
    categories: tuple[str, ...]           # sorted categories present in the encoded data
    patches_per_category: tuple[int, ...]  # encoded patches of each category (same order)
    n_images: int = 0
    fingerprint: int = 0                  # codes.fingerprint of the encoded image ids: what a fresh build carries

    @property
    def n_patches(self) -> int:
        return int(sum(self.patches_per_category))


_INFO_CACHE: dict[tuple[str, str, int], SaeInfo] = {}


def sae_info(store: Store, sae_id: str) -> SaeInfo:
    """Grid, k, C, categories and fingerprint of an encoded SAE; cached per (store, sae, sae_codes version)."""
    if not store.has_table(CODES):
        raise AtomQueryError(f"{store.uri} has no sae_codes table; run `spg encode` for SAE {sae_id!r} first")
    ds = store.db.open_table(CODES).to_lance()   # the latest version: the cache key
    key = (store.uri, sae_id, ds.version)
    if key in _INFO_CACHE:
        return _INFO_CACHE[key]
    t = ds.to_table(columns=["image_id", "category", "grid_h", "grid_w", "k"], filter=where(sae_id=sae_id))
    if t.num_rows == 0:
        known = sorted(set(ds.to_table(columns=["sae_id"]).column("sae_id").to_pylist()))
        raise AtomQueryError(f"no SAE codes for {sae_id!r} in {store.uri}; run `spg encode` for it first "
                             f"(encoded SAEs: {', '.join(known[:5]) or 'none'}{' …' if len(known) > 5 else ''})")
    grids = set(zip(t.column("grid_h").to_pylist(), t.column("grid_w").to_pylist(), t.column("k").to_pylist()))
    if len(grids) != 1:
        raise AtomQueryError(f"SAE {sae_id!r} has codes of several grids/k {sorted(grids)}; re-encode it")
    gh, gw, k = grids.pop()
    sizes = pa.table({"category": t.column("category"),
                      "n": pc.multiply(t.column("grid_h").cast(pa.int64()), t.column("grid_w").cast(pa.int64()))})
    per_cat = sizes.group_by("category").aggregate([("n", "sum")]).sort_by("category")
    model = store.read(sae_models.TABLE, where(sae_id=sae_id), ["C", "backbone", "layer"]).to_pylist()
    m = model[0] if model else {}
    info = SaeInfo(sae_id, int(gh), int(gw), int(k), m.get("C"), m.get("backbone"), m.get("layer"),
                   tuple(per_cat.column("category").to_pylist()), tuple(per_cat.column("n_sum").to_pylist()),
                   len(set(t.column("image_id").to_pylist())), codes.fingerprint(t.column("image_id")))
    _INFO_CACHE[key] = info
    return info


def _check(info: SaeInfo, atom: int, category: str | None = None) -> None:
    if atom < 0 or (info.C is not None and atom >= info.C):
        raise AtomQueryError(f"atom {atom} out of range for SAE {info.sae_id!r}: atoms are 0..{info.C - 1}"
                             if info.C is not None else f"atom {atom} out of range: atoms are >= 0")
    if category is not None and category not in info.categories:
        raise AtomQueryError(f"unknown category {category!r} for SAE {info.sae_id!r}; known: "
                             f"{', '.join(info.categories)}")


def _require_built(store: Store, info: SaeInfo, table: str, rows: pa.Table | None = None) -> None:
    """Refuse a derived table that is missing for the SAE or was built from other encoded images than now."""
    if rows is not None and rows.num_rows:
        built = int(rows.column("built_from")[0].as_py())
    else:
        st = codes.stamp(store, table, info.sae_id)
        if st is None:
            raise AtomQueryError(f"{table} has no rows for SAE {info.sae_id!r}; run `spg encode --sae "
                                 f"{info.sae_id}` (it builds atom_images and atom_top from sae_codes)")
        built = st[0]
    if built != info.fingerprint:
        raise AtomQueryError(f"{table} of SAE {info.sae_id!r} is stale: it was built from another set of images "
                             f"than the {info.n_images} images sae_codes holds now (an encode is running or was "
                             f"interrupted); re-run `spg encode --sae {info.sae_id}` to rebuild it")


def _finish(t: pa.Table, n: int, grid_w: int) -> pa.Table:
    """Sort in the canonical order, keep n, add rank/row/col; columns TOP_COLUMNS."""
    t = t.sort_by(_ORDER).slice(0, n)
    patch = t.column("patch").to_numpy().astype(np.int32)
    return pa.table({"rank": pa.array(np.arange(t.num_rows, dtype=np.int32)), "image_id": t.column("image_id"),
                     "category": t.column("category"), "patch": pa.array(patch),
                     "row": pa.array(patch // grid_w), "col": pa.array(patch % grid_w),
                     "value": t.column("value").cast(pa.float32())})


_EMPTY_HITS = pa.schema([("image_id", pa.string()), ("category", pa.string()), ("patch", pa.int32()),
                         ("value", pa.float32())])


def _hits(store: Store, sae_id: str, atom: int, image_ids: list[str]) -> pa.Table:
    """Every firing of ``atom`` in the given images, read from their sae_codes rows."""
    parts = [_EMPTY_HITS.empty_table()]
    for b in codes.iter_codes(store, sae_id, ["image_id", "category", "k"], image_ids=image_ids):
        row, patch, a, value = codes.activations(b)
        sel = a == atom
        rows = pa.array(row[sel])
        parts.append(pa.table({"image_id": b.column("image_id").take(rows), "category": b.column("category").take(rows),
                               "patch": pa.array(patch[sel]), "value": pa.array(value[sel])}, schema=_EMPTY_HITS))
    return pa.concat_tables(parts)


def _top_beyond_n(store: Store, info: SaeInfo, atom: int, n: int, category: str | None) -> pa.Table:
    """Exact top-n when n exceeds atom_top's N: atom_images says which images hold the atom and their maximum;
    read the codes of the fewest images (by maximum) that hold n firings, whose n-th best value τ bounds the
    answer from below, then of every other image whose maximum reaches τ. No other image can place a patch."""
    imgs = codes.read_images(store, info.sae_id, atom, category, ["image_id", "count", "max_value"])
    if imgs is None:
        raise AtomQueryError(f"{store.uri} has no current atom_images table; run `spg encode --sae {info.sae_id}`")
    _require_built(store, info, IMAGES)
    imgs = imgs.sort_by([("max_value", "descending"), ("image_id", "ascending")])
    ids = imgs.column("image_id").to_pylist()
    m = int(np.searchsorted(np.cumsum(imgs.column("count").to_numpy()), n)) + 1
    first = _hits(store, info.sae_id, atom, ids[:m])
    vals = np.sort(first.column("value").to_numpy())[::-1]
    tau = vals[n - 1] if len(vals) >= n else 0.0
    more = [i for i, mx in zip(ids[m:], imgs.column("max_value").to_numpy()[m:]) if mx >= tau]
    hits = pa.concat_tables([first, _hits(store, info.sae_id, atom, more)]) if more else first
    return _finish(hits, n, info.grid_w)


def top_patches(store: Store, sae_id: str, atom: int, n: int = 8, category: str | None = None) -> pa.Table:
    """The n strongest patches of ``atom`` (columns TOP_COLUMNS, rank 0 = strongest), over every category or
    within ``category``.

    One indexed lookup in atom_top (scope "" or the category). When n exceeds the N atom_top was built with and
    the atom fires more than N times in that scope, the exact answer comes from atom_images and the sae_codes rows
    of the few images that can hold it.
    """
    info = sae_info(store, sae_id)
    _check(info, atom, category)
    t = codes.read_top(store, sae_id, atom, ALL if category is None else category)
    if t is None:
        raise AtomQueryError(f"{store.uri} has no current atom_top table; run `spg encode --sae {sae_id}`")
    _require_built(store, info, TOP, t)
    if t.num_rows >= n or t.num_rows < (t.column("top_n")[0].as_py() if t.num_rows else 1):
        return _finish(t.sort_by("rank").slice(0, n).select(["image_id", "category", "patch", "value"]), n,
                       info.grid_w)
    return _top_beyond_n(store, info, atom, n, category)


def images_firing(store: Store, sae_id: str, atom: int, category: str | None = None) -> pa.Table:
    """Every image ``atom`` fires in (within ``category``), strongest maximum first (then image_id): columns
    IMAGE_COLUMNS (row/col of max_patch). One indexed lookup in atom_images."""
    info = sae_info(store, sae_id)
    _check(info, atom, category)
    # built_from is checked by one probe, not read per row: Lance run-length encodes a constant column, which
    # makes it slow to gather at thousands of scattered rows
    t = codes.read_images(store, sae_id, atom, category, [c for c in IMAGE_COLUMNS if c not in ("row", "col")])
    if t is None:
        raise AtomQueryError(f"{store.uri} has no current atom_images table; run `spg encode --sae {sae_id}`")
    _require_built(store, info, IMAGES)
    t = t.sort_by([("max_value", "descending"), ("image_id", "ascending")])
    mp = t.column("max_patch").to_numpy().astype(np.int32)
    return t.append_column("row", pa.array(mp // info.grid_w)).append_column("col", pa.array(mp % info.grid_w))


def _iter_codes(store: Store, sae_id: str, columns: list[str], extra: str | None = None, batch_size: int = 256):
    """Stream sae_codes of one SAE as (batch, flat indices, flat values, row of each entry, entry within row).
    Decoded here on purpose, not by :mod:`.codes`: the reference path shares no code with the build."""
    filt = where(extra, sae_id=sae_id)
    ds = store.lance(CODES)
    for b in ds.to_batches(columns=[*columns, "indices", "values"], filter=filt, batch_size=batch_size):
        if b.num_rows == 0:
            continue
        ind, val = b.column("indices"), b.column("values")
        offs = ind.offsets.to_numpy()
        idx = ind.values.to_numpy()[offs[0]:offs[-1]]
        vals = val.values.to_numpy()[val.offsets.to_numpy()[0]:val.offsets.to_numpy()[-1]]
        row = np.repeat(np.arange(b.num_rows), np.diff(offs))
        yield b, idx, vals, row, np.arange(len(idx)) - (offs[row] - offs[0])


def brute_force_top(store: Store, sae_id: str, atom: int, n: int = 8, category: str | None = None) -> pa.Table:
    """The reference answer of :func:`top_patches`, decoded from every sae_codes row (slow; tests, --verify)."""
    info = sae_info(store, sae_id)
    _check(info, atom, category)
    parts = []
    for b, idx, vals, row, pos in _iter_codes(store, sae_id, ["image_id", "category", "k"],
                                              where(category=category)):
        hit = np.flatnonzero((idx == atom) & (vals > 0))     # value 0 is BatchTopK padding, not a firing
        k = b.column("k").to_numpy()[row[hit]]
        rows = pa.array(row[hit])
        parts.append(pa.table({"image_id": b.column("image_id").take(rows), "category": b.column("category").take(rows),
                               "patch": pa.array((pos[hit] // k).astype(np.int32)), "value": pa.array(vals[hit])}))
    return _finish(pa.concat_tables([_EMPTY_HITS.empty_table(), *parts]), n, info.grid_w)


def activation_maps(store: Store, sae_id: str, image_ids: list[str], atom: int) -> dict[str, np.ndarray]:
    """``atom``'s activation over each image's patch grid, {image_id: float32 [grid_h, grid_w]}, one read."""
    info = sae_info(store, sae_id)
    _check(info, atom)
    out: dict[str, np.ndarray] = {}
    for b, idx, vals, row, _ in _iter_codes(store, sae_id, ["image_id", "grid_h", "grid_w", "k"],
                                            where(image_id=list(set(image_ids)))):
        for r, (iid, gh, gw, k) in enumerate(zip(*(b.column(c).to_pylist()
                                                   for c in ("image_id", "grid_h", "grid_w", "k")))):
            sel = row == r
            hit = (idx[sel] == atom) * vals[sel]
            out[iid] = hit.reshape(gh * gw, k).sum(axis=1).reshape(gh, gw).astype(np.float32)
    missing = [i for i in image_ids if i not in out]
    if missing:
        raise AtomQueryError(f"image(s) {', '.join(missing[:3])} not encoded by SAE {sae_id!r}")
    return out


def atom_activation_map(store: Store, sae_id: str, image_id: str, atom: int) -> np.ndarray:
    """``atom``'s activation over one image's patch grid, float32 [grid_h, grid_w] (0 where it is silent)."""
    return activation_maps(store, sae_id, [image_id], atom)[image_id]


def _add(acc: np.ndarray, key: np.ndarray, weights: np.ndarray | None, size: int) -> np.ndarray:
    """acc += bincount(key), growing acc when key goes past it (C unknown for unregistered SAEs)."""
    bc = np.bincount(key, weights=weights, minlength=size)
    if len(bc) > len(acc):
        acc = np.pad(acc, (0, len(bc) - len(acc)))
    acc[:len(bc)] += bc
    return acc


def atom_stats(store: Store, sae_id: str, per_patch: bool = True, batch_size: int = 1 << 17) -> pd.DataFrame:
    """Per-atom firing statistics streamed from atom_images (bounded memory, vectorised per batch): a firing
    count and mass per (atom, category) is the sum of the atom's per-image rows.

    Columns: atom, count (firings), frequency (count / encoded patches), mean_activation, n_categories (it
    fires in), category_entropy, top_category, top_share, anomalous_share (mass on images labelled
    anomalous) and ``mass:<category>`` per category. category_entropy is the Shannon entropy of the atom's
    distribution over categories divided by log(number of encoded categories): 0 = fires in one category
    only, 1 = spread evenly; NaN for atoms that never fire, 0 when only one category is encoded. With
    ``per_patch`` (default) each category's mass is divided by its number of encoded patches first, so an
    atom firing uniformly everywhere scores 1 even when categories have different numbers of images.

    Two different "not firing" numbers, kept apart: ``count == 0`` means the atom is *silent on the encoded
    images* (a property of that image set); ``dead`` is the one definition of a dead latent, read from the
    record stored with the SAE (not fired in the last ``dead_tokens`` training tokens, the same number as
    ``sae_models.dead_fraction`` and the training log), ``<NA>`` when the SAE has no such record.
    ``df.attrs["training_dead"]`` holds that record's summary (``n_dead``, ``dead_fraction``, ``dead_tokens``,
    ``tokens_seen``, ``definition``) or None.
    """
    info = sae_info(store, sae_id)
    if not codes.readable(store, IMAGES):
        raise AtomQueryError(f"{store.uri} has no current atom_images table; run `spg encode --sae {sae_id}`")
    _require_built(store, info, IMAGES)
    cats = pa.array(info.categories, pa.string())
    ncat = len(cats)
    size = (info.C or 1) * ncat
    counts, mass, anom = np.zeros(size), np.zeros(size), np.zeros(size // ncat)
    for b in codes.iter_images(store, sae_id, ["atom", "category", "label", "count", "sum_value"], batch_size):
        if b.num_rows == 0:
            continue
        code = pc.index_in(b.column("category"), value_set=cats)
        if code.null_count:
            raise AtomQueryError(f"atom_images of SAE {sae_id!r} has categories absent from sae_codes; "
                                 f"re-run `spg encode --sae {sae_id} --rebuild-atoms`")
        atom = b.column("atom").to_numpy().astype(np.int64)
        value = b.column("sum_value").to_numpy().astype(np.float64)
        key = atom * ncat + code.to_numpy()
        counts = _add(counts, key, b.column("count").to_numpy().astype(np.float64), size)
        mass = _add(mass, key, value, size)
        anom = _add(anom, atom, value * (b.column("label").to_numpy() == 1), size // ncat)
    C = max(-(-len(counts) // ncat), -(-len(mass) // ncat), len(anom))   # grown arrays need not end on a row
    counts, mass = np.pad(counts, (0, C * ncat - len(counts))), np.pad(mass, (0, C * ncat - len(mass)))
    counts, mass, anom = counts.reshape(C, ncat).astype(np.int64), mass.reshape(C, ncat), np.pad(anom, (0, C - len(anom)))
    total_count, total_mass = counts.sum(1), mass.sum(1)
    w = mass / np.maximum(np.asarray(info.patches_per_category, np.float64), 1) if per_patch else mass
    fired = total_count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        p = w / w.sum(1, keepdims=True)
        ent = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(1)
        ent = ent / np.log(ncat) if ncat > 1 else np.zeros(C)
        mean = np.where(fired, total_mass / np.maximum(total_count, 1), 0.0)
        anom_share = np.where(total_mass > 0, anom / total_mass, 0.0)
    ent[~fired] = np.nan
    top = np.nan_to_num(p).argmax(1) if C else np.zeros(0, np.int64)
    df = pd.DataFrame({"atom": np.arange(C), "count": total_count, "frequency": total_count / max(info.n_patches, 1),
                       "mean_activation": mean, "n_categories": (counts > 0).sum(1), "category_entropy": ent,
                       "top_category": np.where(fired, np.asarray(info.categories, object)[top], None),
                       "top_share": np.where(fired, np.nan_to_num(p).max(1, initial=0.0), 0.0),
                       "anomalous_share": anom_share})
    for j, c in enumerate(info.categories):
        df[f"mass:{c}"] = mass[:, j]
    rec = _training_dead(store, sae_id, info)
    if rec is None:
        df["dead"] = pd.array([pd.NA] * C, dtype="boolean")
        df.attrs["training_dead"] = None
    else:
        mask = np.zeros(C, bool)
        mask[:min(C, len(rec["dead_mask"]))] = rec["dead_mask"][:C]
        df["dead"] = pd.array(mask, dtype="boolean")
        df.attrs["training_dead"] = {k: rec.get(k) for k in ("n_dead", "dead_fraction", "dead_tokens", "tokens_seen",
                                                             "definition", "C")}
    return df


def _training_dead(store: Store, sae_id: str, info: SaeInfo) -> dict | None:
    """The dead-latent record stored with the SAE (:func:`sae_models.latent_record`), None when absent."""
    if info.C is None:
        return None
    try:
        row = sae_models.get(store, sae_id, with_weights=False)
    except sae_models.UnknownSAEError:
        return None
    return sae_models.latent_record(row)


__all__ = ["AtomQueryError", "IMAGE_COLUMNS", "SaeInfo", "TOP_COLUMNS", "activation_maps", "atom_activation_map",
           "atom_stats", "brute_force_top", "ensure_atom_indexes", "images_firing", "sae_info", "top_patches"]
