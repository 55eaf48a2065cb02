"""Atom queries: which patches an SAE atom fires on, where in an image, and how it spreads over categories.

Three tables answer them (see DESIGN.md): ``atom_top`` (top-N per atom, materialised at encode time) makes
"the strongest patches of atom a" one indexed lookup however large the store grows; ``atom_index`` (one row
per non-zero activation, BTree on ``atom``) answers filtered questions ("atom a within category c") and the
per-atom statistics; ``sae_codes`` is the ground truth both are derived from, used for activation maps and
for :func:`brute_force_top`, the reference the indexed paths are checked against (tests, ``--verify``).

Top-patch order everywhere: value descending, then image_id, then patch ascending, so every path agrees even
on ties. No Ray, no torch: this runs in the CLI process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from lancedb.index import Bitmap, BTree

from spg_dist.store import sae_models
from spg_dist.store.codes import CODES, INDEX, TOP
from spg_dist.store.connection import Store, StoreError
from spg_dist.store.filters import where

TOP_COLUMNS = ("rank", "image_id", "category", "patch", "row", "col", "value")
_ORDER = [("value", "descending"), ("image_id", "ascending"), ("patch", "ascending")]
# (table, column) -> index kind. sae_id and category have few distinct values: Bitmap; atom has many: BTree.
ATOM_INDEXES = {(INDEX, "atom"): BTree, (INDEX, "sae_id"): Bitmap,
                (INDEX, "category"): Bitmap, (TOP, "atom"): BTree, (TOP, "sae_id"): Bitmap}


class AtomQueryError(StoreError, LookupError):
    """An atom query that cannot be answered (unknown SAE, atom out of range, unknown category); one line."""


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

    @property
    def n_patches(self) -> int:
        return int(sum(self.patches_per_category))


_INFO_CACHE: dict[tuple[str, str, int], SaeInfo] = {}


def sae_info(store: Store, sae_id: str) -> SaeInfo:
    """Grid, k, C and categories of an encoded SAE; cached per (store, sae, sae_codes version)."""
    if not store.has_table(CODES):
        raise AtomQueryError(f"{store.uri} has no sae_codes table; run `spg encode` for SAE {sae_id!r} first")
    ds = store.lance(CODES)
    key = (store.uri, sae_id, ds.version)
    if key in _INFO_CACHE:
        return _INFO_CACHE[key]
    t = ds.to_table(columns=["category", "grid_h", "grid_w", "k"], filter=where(sae_id=sae_id))
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
                   tuple(per_cat.column("category").to_pylist()), tuple(per_cat.column("n_sum").to_pylist()))
    _INFO_CACHE[key] = info
    return info


def _check(info: SaeInfo, atom: int, category: str | None = None) -> None:
    if atom < 0 or (info.C is not None and atom >= info.C):
        raise AtomQueryError(f"atom {atom} out of range for SAE {info.sae_id!r}: atoms are 0..{info.C - 1}"
                             if info.C is not None else f"atom {atom} out of range: atoms are >= 0")
    if category is not None and category not in info.categories:
        raise AtomQueryError(f"unknown category {category!r} for SAE {info.sae_id!r}; known: "
                             f"{', '.join(info.categories)}")


def ensure_atom_indexes(store: Store, rebuild: bool = False) -> dict[str, list[str]]:
    """Scalar indexes on atom_index / atom_top (BTree on atom, Bitmap on sae_id, category); idempotent.

    Missing indexes are created; existing ones are brought up to date with rows appended since (cheap,
    incremental) or rebuilt from scratch with ``rebuild``. Returns the indexed columns per table.
    """
    done: dict[str, list[str]] = {}
    for table in sorted({t for t, _ in ATOM_INDEXES}):
        tbl = store.table(table)
        have = {cfg.columns[0]: cfg for cfg in tbl.list_indices()}
        stale = False
        for (t, col), kind in ATOM_INDEXES.items():
            if t != table:
                continue
            if rebuild or col not in have:
                tbl.create_index(col, config=kind(), replace=True)
            else:
                stale |= bool(getattr(have[col], "num_unindexed_rows", 0))
            done.setdefault(table, []).append(col)
        if stale:
            tbl.to_lance().optimize.optimize_indices()
    return done


def _finish(t: pa.Table, n: int, grid_w: int) -> pa.Table:
    """Sort in the canonical order, keep n, add rank/row/col; columns TOP_COLUMNS."""
    t = t.sort_by(_ORDER).slice(0, n)
    patch = t.column("patch").to_numpy().astype(np.int32)
    return pa.table({"rank": pa.array(np.arange(t.num_rows, dtype=np.int32)), "image_id": t.column("image_id"),
                     "category": t.column("category"), "patch": pa.array(patch),
                     "row": pa.array(patch // grid_w), "col": pa.array(patch % grid_w),
                     "value": t.column("value").cast(pa.float32())})


def top_patches(store: Store, sae_id: str, atom: int, n: int = 8, category: str | None = None) -> pa.Table:
    """The n strongest patches of ``atom`` (columns TOP_COLUMNS, rank 0 = strongest).

    Without a category: one indexed lookup in atom_top; when atom_top holds fewer than n rows for the atom
    (N < n at encode time, or not materialised) it falls back to atom_index. With a category: atom_index
    filtered on (sae_id, atom, category), which the BTree on atom makes a lookup, not a scan.
    """
    info = sae_info(store, sae_id)
    _check(info, atom, category)
    if category is None and store.has_table(TOP):
        t = store.read(TOP, where(sae_id=sae_id, atom=int(atom)),
                       ["rank", "image_id", "category", "patch", "value"])
        if t.num_rows >= n:
            return _finish(t.sort_by("rank").slice(0, n).drop_columns(["rank"]), n, info.grid_w)
    t = store.read(INDEX, where(sae_id=sae_id, atom=int(atom), category=category),
                   ["image_id", "category", "patch", "value"])
    if t.num_rows == 0 and store.count(INDEX, where(sae_id=sae_id)) == 0:
        raise AtomQueryError(f"atom_index has no rows for SAE {sae_id!r}; re-run `spg encode` for it")
    return _finish(t, n, info.grid_w)


def _iter_codes(store: Store, sae_id: str, columns: list[str], extra: str | None = None, batch_size: int = 256):
    """Stream sae_codes of one SAE as (batch, flat indices, flat values, row of each entry, entry within row)."""
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
    empty = pa.table({"image_id": pa.array([], pa.string()), "category": pa.array([], pa.string()),
                      "patch": pa.array([], pa.int32()), "value": pa.array([], pa.float32())})
    return _finish(pa.concat_tables([empty, *parts]), n, info.grid_w)


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
    """Per-atom firing statistics streamed from atom_index (bounded memory, vectorised per batch).

    Columns: atom, count (firings), frequency (count / encoded patches), mean_activation, n_categories (it
    fires in), category_entropy, top_category, top_share, anomalous_share (mass on images labelled
    anomalous) and ``mass:<category>`` per category. category_entropy is the Shannon entropy of the atom's
    distribution over categories divided by log(number of encoded categories): 0 = fires in one category
    only, 1 = spread evenly; NaN for atoms that never fire, 0 when only one category is encoded. With
    ``per_patch`` (default) each category's mass is divided by its number of encoded patches first, so an
    atom firing uniformly everywhere scores 1 even when categories have different numbers of images.
    """
    info = sae_info(store, sae_id)
    cats = pa.array(info.categories, pa.string())
    ncat = len(cats)
    size = (info.C or 1) * ncat
    counts, mass, anom = np.zeros(size, np.int64), np.zeros(size), np.zeros(size // ncat)
    ds, seen = store.lance(INDEX), 0
    for b in ds.to_batches(columns=["atom", "category", "label", "value"], filter=where(sae_id=sae_id),
                           batch_size=batch_size):
        if b.num_rows == 0:
            continue
        seen += b.num_rows
        code = pc.index_in(b.column("category"), value_set=cats)
        if code.null_count:
            raise AtomQueryError(f"atom_index of SAE {sae_id!r} has categories absent from sae_codes; "
                                 "re-run `spg encode` for it")
        atom = b.column("atom").to_numpy().astype(np.int64)
        value = b.column("value").to_numpy().astype(np.float64)
        key = atom * ncat + code.to_numpy()
        counts = _add(counts, key, None, size)
        mass = _add(mass, key, value, size)
        anom = _add(anom, atom, value * (b.column("label").to_numpy() == 1), size // ncat)
    if not seen:
        raise AtomQueryError(f"atom_index has no rows for SAE {sae_id!r}; re-run `spg encode` for it")
    C = max(-(-len(counts) // ncat), -(-len(mass) // ncat), len(anom))   # grown arrays need not end on a row
    counts, mass = np.pad(counts, (0, C * ncat - len(counts))), np.pad(mass, (0, C * ncat - len(mass)))
    counts, mass, anom = counts.reshape(C, ncat), mass.reshape(C, ncat), np.pad(anom, (0, C - len(anom)))
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
    return df


__all__ = ["AtomQueryError", "SaeInfo", "TOP_COLUMNS", "ensure_atom_indexes", "sae_info", "top_patches",
           "brute_force_top", "activation_maps", "atom_activation_map", "atom_stats"]
