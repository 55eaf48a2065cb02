"""``sae_codes`` and the two tables derived from it for atom queries (the queries live in :mod:`.atoms`).

* ``sae_codes`` — the source of truth: one row per (SAE, image), every patch's TopK indices and values. Encode
  workers write it as fragments; :func:`commit` stores each (sae_id, image_id) once however many encodes race
  (:meth:`Store.commit_fragments`).
* ``atom_images`` — one row per (SAE, atom, image) the atom fires in: patches it fires on (``count``), their sum,
  the maximum and where it is. "Which images fire atom a" is one indexed lookup, and per-atom statistics are sums
  over its rows. About one row per 10 activations at C = 4096, k = 32 (one row per activation was ``atom_index``).
* ``atom_top`` — per (SAE, scope, atom) the N strongest activations, ``scope`` "" over all categories and a
  category name within that category, so "top-8 of atom a [within category c]" is one indexed lookup.

How the derived tables are written: never incrementally. :func:`build_atoms` recomputes both from *all* of the
SAE's sae_codes rows in one streaming pass (batches of images; per (scope, atom) a running top-N merged with
vectorised sorts; per batch the (image, atom) aggregates) and replaces the SAE's rows of each table in one
commit. Recompute, not merge with what is stored, because a merge is exact only if one knows exactly which
images the stored rows already cover, and that is what an interrupted or racing encode leaves uncertain (the
2,037 entries atom_top lost after a killed encode); a recompute is a pure function of sae_codes, so no history
(kills between commits, racing encodes, hand edits, repairs) can leak into it. Its cost is one read of the
SAE's codes — small next to encoding them — and it is skipped when nothing changed (below).

Why the result is exact after any interruption: every derived row carries ``built_from``, the
:func:`fingerprint` of the set of sae_codes image ids its build read (``atom_top`` also its ``top_n``). A build

1. reads the SAE's sae_codes at one version and its fingerprint F; stops when both derived tables carry F;
2. computes the rows from that version only;
3. per table: reads the table's latest version V, re-reads the *current* sae_codes fingerprint and gives up
   this attempt unless it is still F, then commits "delete the SAE's rows of V, add mine" at ``read_version=V``
   as an operation Lance refuses to rebase over any other data change (as :mod:`.commits` does), retrying 3 on a
   conflict; when sae_codes moved on, it starts again at 1.

So a commit lands only if sae_codes had not changed when V was read and no other build committed after V;
every encode builds after its last codes commit, so the last build to commit read the final sae_codes: the
tables equal a from-scratch build. A run killed anywhere leaves tables whose ``built_from`` differs from the
current fingerprint; queries refuse such stale rows (one clear error) and the next ``spg encode`` rebuilds them.
(The fingerprint is of image ids: codes replaced in place under the same key — encode never does that — need
``build_atoms(force=True)`` / ``spg encode --rebuild-atoms``.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lance.commit import CommitConflictError
from lancedb.index import Bitmap, BTree

from spg_dist.store import commits
from spg_dist.store.connection import Store, StoreError
from spg_dist.store.filters import where
from spg_dist.store.schemas import VERSION_KEY, load_schema

CODES = "sae_codes"
IMAGES = "atom_images"
TOP = "atom_top"
DERIVED = (IMAGES, TOP)
ALL = ""                    # atom_top scope of the ranking over every category
DEFAULT_TOP_N = 64
BUILD_VERSION = 1           # part of the fingerprint: a new build algorithm invalidates every stored build
SOURCE_COLUMNS = ("image_id", "category", "split", "label", "grid_h", "grid_w", "k")
# (table, column) -> index kind. sae_id, scope and category have few distinct values: Bitmap; atom has many: BTree.
ATOM_INDEXES = {(IMAGES, "atom"): BTree, (IMAGES, "sae_id"): Bitmap, (IMAGES, "category"): Bitmap,
                (TOP, "atom"): BTree, (TOP, "sae_id"): Bitmap, (TOP, "scope"): Bitmap}
_I32MAX = np.iinfo(np.int32).max


# ------------------------------------------------------------------------------------------------ sae_codes
def lance_uri(store: Store) -> str:
    """Where encode workers write their uncommitted sae_codes fragments."""
    return store.lance_uri(CODES)


def encoded_image_ids(store: Store, sae_id: str) -> set[str]:
    return {image_id for _, image_id in store.keys(CODES, where=where(sae_id=sae_id))}


def commit(store: Store, fragments: Sequence[str]) -> int:
    """Commit sae_codes fragments; a key another encode committed meanwhile is dropped (first writer wins)."""
    return store.commit_fragments(CODES, fragments)


def grid_w(store: Store, sae_id: str) -> int | None:
    t = store.read(CODES, where=where(sae_id=sae_id), columns=["grid_w"])
    return int(t.column("grid_w")[0].as_py()) if t.num_rows else None


def fingerprint(image_ids: Sequence[str] | pa.Array | pa.ChunkedArray) -> int:
    """A signed 64-bit digest of a set of image ids (order and repeats ignored): what a build of the derived
    tables read, stored with its rows as ``built_from``."""
    if isinstance(image_ids, (pa.Array, pa.ChunkedArray)):
        image_ids = image_ids.to_pylist()
    h = hashlib.blake2b(f"spg.atoms/{BUILD_VERSION}\0".encode(), digest_size=8)
    h.update("\0".join(sorted(set(image_ids))).encode())
    return int.from_bytes(h.digest(), "little", signed=True)


@dataclass(frozen=True)
class Source:
    """One SAE's sae_codes at one version: the pinned dataset, its images (one row per image_id, sorted by it:
    the position is the image's tie-break rank) and their fingerprint."""
    dataset: lance.LanceDataset | None
    images: pa.Table
    fingerprint: int
    categories: tuple[str, ...]

    @property
    def n_images(self) -> int:
        return self.images.num_rows


def source(store: Store, sae_id: str) -> Source:
    """The SAE's sae_codes now (one scan of scalar columns)."""
    empty = load_schema(CODES).arrow.empty_table().select(list(SOURCE_COLUMNS))
    if not store.has_table(CODES):
        return Source(None, empty, fingerprint([]), ())
    ds = store.lance(CODES)
    t = ds.to_table(columns=list(SOURCE_COLUMNS), filter=where(sae_id=sae_id))
    if t.num_rows:
        t = t.take(pc.sort_indices(t, sort_keys=[("image_id", "ascending")]))
        ids = t.column("image_id").combine_chunks()
        if t.num_rows > 1:  # a key stored twice (an older writer; `spg store check --repair`): read it once
            first = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))
            t = t.filter(pa.concat_arrays([pa.array([True]), first]))
    return Source(ds, t, fingerprint(t.column("image_id")),
                  tuple(sorted(set(t.column("category").to_pylist()))))


def current_fingerprint(store: Store, sae_id: str) -> int:
    if not store.has_table(CODES):
        return fingerprint([])
    return fingerprint(store.lance(CODES).to_table(columns=["image_id"], filter=where(sae_id=sae_id))
                       .column("image_id"))


# ------------------------------------------------------------------------------------------------ derived tables
def _derived(store: Store, name: str):
    """A derived table, recreated empty when it was written by another schema version (it is rebuilt from
    sae_codes, so nothing is lost): the one migration these tables need."""
    if store.has_table(name):
        meta = store.db.open_table(name).schema.metadata or {}
        found = meta.get(VERSION_KEY)
        if found is not None and int(found) != load_schema(name).version:
            try:
                store.db.drop_table(name)
            except Exception:  # noqa: BLE001 — a concurrent build dropped it first
                pass
    return store.table(name)


def readable(store: Store, table: str) -> bool:
    """The derived table exists and was written by this schema version (else a build recreates it)."""
    if not store.has_table(table):
        return False
    found = (store.db.open_table(table).schema.metadata or {}).get(VERSION_KEY)
    return found is None or int(found) == load_schema(table).version


_STAMPS: dict[tuple[str, str, int, str], tuple[int, int] | None] = {}


def stamp(store: Store, table: str, sae_id: str) -> tuple[int, int] | None:
    """(built_from, top_n) of the SAE's rows in a derived table (top_n 0 for atom_images); None when it holds
    none or the table is of another schema version. Cached per table version (a probe decodes a whole page of
    the run-length-encoded column: ~10 ms)."""
    if not readable(store, table):
        return None
    ds = store.db.open_table(table).to_lance()
    key = (store.uri, table, ds.version, sae_id)
    if key not in _STAMPS:
        cols = ["built_from", "top_n"] if table == TOP else ["built_from"]
        t = ds.to_table(columns=cols, filter=where(sae_id=sae_id), limit=1)
        _STAMPS[key] = None if t.num_rows == 0 else (
            int(t.column("built_from")[0].as_py()), int(t.column("top_n")[0].as_py()) if table == TOP else 0)
        if len(_STAMPS) > 4096:
            _STAMPS.clear()
    return _STAMPS[key]


def top_per_atom(atoms: np.ndarray, values: np.ndarray, n: int, image_ids: np.ndarray, patches: np.ndarray
                 ) -> np.ndarray:
    """Indices of the ``n`` largest values of each atom, grouped by atom, strongest first; ties broken by
    (image_id, patch) as the query side does. ``image_ids`` may be strings or integer ranks."""
    ids = image_ids.astype(str) if image_ids.dtype == object else image_ids
    order = np.lexsort((patches, ids, -values, atoms))
    a = atoms[order]
    return order[_rank_in_groups(a) < n]


def _rank_in_groups(sorted_keys: np.ndarray) -> np.ndarray:
    if len(sorted_keys) == 0:
        return np.zeros(0, np.int64)
    starts = np.r_[0, np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1]
    return np.arange(len(sorted_keys)) - np.repeat(starts, np.diff(np.r_[starts, len(sorted_keys)]))


def flat_codes(b: pa.RecordBatch | pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat atom indices, flat values, start of each row's entries relative to the first, length n+1)."""
    ind, val = b.column("indices"), b.column("values")
    if isinstance(ind, pa.ChunkedArray):
        ind, val = ind.combine_chunks(), val.combine_chunks()
    offs, voffs = ind.offsets.to_numpy(), val.offsets.to_numpy()
    if not np.array_equal(offs - offs[0], voffs - voffs[0]):
        raise StoreError("sae_codes rows whose indices and values differ in length")
    idx = ind.values.to_numpy()[offs[0]:offs[-1]]
    vals = val.values.to_numpy(zero_copy_only=False)[voffs[0]:voffs[-1]]
    return idx, vals, offs - offs[0]


def activations(b: pa.RecordBatch | pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The firings (value > 0; BatchTopK pads with value 0) of sae_codes rows: (row, patch, atom, value)."""
    idx, vals, rel = flat_codes(b)
    pos = np.flatnonzero(vals > 0)
    row = (np.searchsorted(rel, pos, side="right") - 1).astype(np.int32)
    k = b.column("k").to_numpy() if isinstance(b, pa.RecordBatch) else b.column("k").to_numpy()
    patch = ((pos - rel[row]) // k[row]).astype(np.int32)
    return row, patch, idx[pos].astype(np.int32), vals[pos].astype(np.float32)


class _TopN:
    """Running top-N per group (group = scope * C + atom) over a stream of candidates, exact with ties.

    A candidate is compared with its group's threshold (the N-th best value so far, -1 while fewer than N) and
    kept when >= it (an equal value can still win on image_id/patch). Kept candidates pile up and are merged with
    the running top-N by one sort when they outnumber it: the sort key is (group, value desc) packed in one
    int64, then (image rank, patch), so the merge is two integer sorts however many candidates arrive.
    """

    def __init__(self, n: int, n_scopes: int, C: int, merge_at: int = 1 << 21):
        self.n, self.n_scopes, self.C, self.merge_at = n, n_scopes, max(C, 1), merge_at
        self.thr = np.full((n_scopes, self.C), -1.0, np.float32)
        self.cols = ("scope", "atom", "value", "image", "patch")
        self.run = {c: np.zeros(0, np.float32 if c == "value" else np.int32) for c in self.cols}
        self.pending: list[dict[str, np.ndarray]] = []
        self.n_pending = 0

    def _grow(self, C: int) -> None:
        if C > self.C:
            self.thr = np.pad(self.thr, ((0, 0), (0, C - self.C)), constant_values=-1.0)
            self.C = C

    def add(self, scope: np.ndarray, atom: np.ndarray, value: np.ndarray, image: np.ndarray,
            patch: np.ndarray) -> None:
        if len(atom) == 0:
            return
        self._grow(int(atom.max()) + 1)
        keep = value >= self.thr.ravel()[scope.astype(np.int64) * self.C + atom]
        if not keep.any():
            return
        self.pending.append({"scope": scope[keep], "atom": atom[keep], "value": value[keep],
                             "image": image[keep], "patch": patch[keep]})
        self.n_pending += int(keep.sum())
        if self.n_pending >= max(self.merge_at, len(self.run["atom"])):
            self.merge()

    def merge(self) -> None:
        if not self.pending:
            return
        allc = {c: np.concatenate([self.run[c]] + [p[c] for p in self.pending]) for c in self.cols}
        self.pending, self.n_pending = [], 0
        group = allc["scope"].astype(np.int64) * self.C + allc["atom"]
        inv = np.uint32(0xFFFFFFFF) - allc["value"].view(np.uint32)   # value > 0: bits order like values
        primary = (group << 32) | inv.astype(np.int64)
        tie = (allc["image"].astype(np.int64) << 24) | allc["patch"]
        order = np.lexsort((tie, primary))
        g = group[order]
        order = order[_rank_in_groups(g) < self.n]
        self.run = {c: allc[c][order] for c in self.cols}
        g = group[order]
        if len(g):
            last = np.r_[np.flatnonzero(g[1:] != g[:-1]), len(g) - 1]
            size = np.diff(np.r_[-1, last])
            full = last[size == self.n]
            self.thr.ravel()[g[full]] = self.run["value"][full]

    def result(self) -> dict[str, np.ndarray]:
        """The top-N rows sorted by (scope, atom, rank), with their rank."""
        self.merge()
        g = self.run["scope"].astype(np.int64) * self.C + self.run["atom"]
        return {**self.run, "rank": _rank_in_groups(g).astype(np.int32)}


@dataclass
class BuildResult:
    """What :func:`build_atoms` did: ``rebuilt`` names the tables it rewrote (empty: they were current)."""
    sae_id: str
    images: int = 0
    activations: int = 0
    atom_images_rows: int = 0
    atom_top_rows: int = 0
    top_n: int = DEFAULT_TOP_N
    rebuilt: tuple[str, ...] = ()
    restarts: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        if not self.rebuilt:
            return f"atom_images/atom_top of {self.sae_id} already match its {self.images} encoded images"
        return (f"built {', '.join(self.rebuilt)} of {self.sae_id} from {self.images} images "
                f"({self.activations:,} activations): {self.atom_images_rows:,} atom_images rows, "
                f"{self.atom_top_rows:,} atom_top rows (top-{self.top_n} per atom and scope) in {self.seconds:.1f} s")


class _Deriver:
    """One streaming pass over a :class:`Source`: atom_images fragments (written as chunks fill, each chunk sorted
    by (atom, image_id) so an atom's rows sit together) and the running top-N per (scope, atom)."""

    def __init__(self, store: Store, sae_id: str, src: Source, top_n: int, want_images: bool, want_top: bool,
                 C: int, chunk_rows: int):
        self.store, self.sae_id, self.src, self.top_n = store, sae_id, src, top_n
        self.want_images, self.want_top, self.chunk_rows = want_images, want_top, chunk_rows
        imgs = src.images
        self.ids = imgs.column("image_id").combine_chunks()
        cats = pa.array(list(src.categories), pa.string())
        self.cat_code = (pc.index_in(imgs.column("category"), value_set=cats).to_numpy(zero_copy_only=False)
                         .astype(np.int32) + 1) if imgs.num_rows else np.zeros(0, np.int32)
        self.grid_w = imgs.column("grid_w").to_numpy().astype(np.int32) if imgs.num_rows else np.zeros(0, np.int32)
        self.seen = np.zeros(imgs.num_rows, bool)
        self.top = _TopN(top_n, len(src.categories) + 1, C)
        self.pending: list[dict[str, np.ndarray]] = []
        self.n_pending = 0
        self.fragments: list = []
        self.rows = 0
        self.activations = 0

    def add(self, b: pa.RecordBatch) -> None:
        if b.num_rows == 0:
            return
        found = pc.index_in(b.column("image_id"), value_set=self.ids)
        if found.null_count:  # cannot happen: the scan and the image list read one pinned version
            raise StoreError(f"sae_codes of {self.sae_id!r} changed under a pinned read")
        rank = found.to_numpy().astype(np.int64)
        fresh = ~self.seen[rank]
        _, first = np.unique(rank, return_index=True)
        fresh[np.setdiff1d(np.arange(len(rank)), first)] = False   # a key stored twice is read once
        self.seen[rank] = True
        row, patch, atom, value = activations(b)
        if not fresh.all():
            ok = fresh[row]
            row, patch, atom, value = row[ok], patch[ok], atom[ok], value[ok]
        self.activations += len(atom)
        if len(atom) == 0:
            return
        img = rank[row].astype(np.int32)
        if self.want_top:
            scope = np.zeros(len(atom), np.int32)
            self.top.add(scope, atom, value, img, patch)                      # scope "": every category
            self.top.add(self.cat_code[img], atom, value, img, patch)         # scope = the image's category
        if self.want_images:
            self._aggregate(b.num_rows, row, patch, atom, value, rank)

    def _aggregate(self, n: int, row, patch, atom, value, rank) -> None:
        """(image, atom) -> count, sum, max, lowest patch at the max; vectorised with bincount / ufunc.at."""
        C = int(atom.max()) + 1
        key = row.astype(np.int64) * C + atom
        if n * C <= (1 << 25):
            bins, kk, uniq = n * C, key, None
        else:
            uniq, kk = np.unique(key, return_inverse=True)
            bins = len(uniq)
        count = np.bincount(kk, minlength=bins)
        total = np.bincount(kk, weights=value, minlength=bins)
        mx = np.zeros(bins, np.float32)
        np.maximum.at(mx, kk, value)
        at_max = value == mx[kk]
        mp = np.full(bins, _I32MAX, np.int32)
        np.minimum.at(mp, kk[at_max], patch[at_max])
        nz = np.flatnonzero(count)
        k = nz if uniq is None else uniq[nz]
        self.pending.append({"atom": (k % C).astype(np.int32), "image": rank[k // C].astype(np.int32),
                             "count": count[nz].astype(np.int32), "sum_value": total[nz],
                             "max_value": mx[nz], "max_patch": mp[nz]})
        self.n_pending += len(nz)
        if self.n_pending >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        cols = {c: np.concatenate([p[c] for p in self.pending]) for c in self.pending[0]}
        self.pending, self.n_pending = [], 0
        order = np.argsort((cols["atom"].astype(np.int64) << 32) | cols["image"], kind="stable")
        cols = {c: v[order] for c, v in cols.items()}
        img = pa.array(cols.pop("image"))
        src = self.src.images
        n = len(img)
        t = pa.table({"sae_id": pa.array([self.sae_id]).take(pa.array(np.zeros(n, np.int32))),
                      "atom": cols["atom"], "image_id": self.ids.take(img),
                      "category": src.column("category").take(img), "split": src.column("split").take(img),
                      "label": src.column("label").take(img), "count": cols["count"],
                      "sum_value": cols["sum_value"], "max_value": cols["max_value"],
                      "max_patch": cols["max_patch"], "built_from": np.full(n, self.src.fingerprint, np.int64)})
        self.fragments.extend(_write(self.store, IMAGES, t, n))   # one file per chunk: one run per atom
        self.rows += n

    def top_table(self) -> pa.Table:
        r = self.top.result()
        img = pa.array(r["image"])
        scopes = pa.array([ALL, *self.src.categories], pa.string())
        gw = self.grid_w[r["image"]] if len(r["image"]) else np.zeros(0, np.int32)
        gw = np.maximum(gw, 1)
        n = len(img)
        return pa.table({"sae_id": pa.array([self.sae_id]).take(pa.array(np.zeros(n, np.int32))),
                         "scope": scopes.take(pa.array(r["scope"])), "atom": r["atom"], "rank": r["rank"],
                         "image_id": self.ids.take(img), "category": self.src.images.column("category").take(img),
                         "patch": r["patch"], "row": (r["patch"] // gw).astype(np.int16),
                         "col": (r["patch"] % gw).astype(np.int16), "value": r["value"],
                         "top_n": np.full(n, self.top_n, np.int32),
                         "built_from": np.full(n, self.src.fingerprint, np.int64)})


def _write(store: Store, name: str, table: pa.Table, max_rows: int) -> list:
    """Uncommitted fragments of ``table`` next to the derived table ``name``."""
    schema = load_schema(name)
    table = schema.validate(table)
    if table.num_rows == 0:
        return []
    return lance.fragment.write_fragments(table, store.lance_uri(name), schema=schema.arrow,
                                          max_rows_per_file=max(max_rows, 1),
                                          storage_options=store.storage_options)


def _replace(store: Store, name: str, sae_id: str, new: list, still_current: Callable[[], bool]) -> bool:
    """Replace every row of ``sae_id`` in ``name`` by the fragments ``new`` in one commit that Lance refuses to
    rebase over any concurrent data change; False (nothing committed) when ``still_current()`` turns false."""
    uri, opts = store.lance_uri(name), store.storage_options
    new = [dataclasses.replace(f, row_id_meta=None) for f in new]
    for attempt in range(commits.MAX_ATTEMPTS):
        ds = lance.dataset(uri, storage_options=opts)
        version = ds.version
        if not still_current():
            return False
        old = ds.to_table(columns=["sae_id"], filter=where(sae_id=sae_id), with_row_address=True)
        addr = old.column("_rowaddr").to_numpy().astype(np.uint64) if old.num_rows else np.zeros(0, np.uint64)
        frag_of, off = (addr >> np.uint64(32)).astype(np.int64), (addr & np.uint64(0xFFFFFFFF)).astype(np.int64)
        mine: dict[int, np.ndarray] = {int(f): off[frag_of == f] for f in np.unique(frag_of)}
        if not mine and not new:
            return True
        kept, removed, touched = [], [], False
        for frag in ds.get_fragments():
            fid = frag.fragment_id
            if fid not in mine:
                kept.append(frag.metadata)
            elif len(mine[fid]) == frag.count_rows():
                removed.append(fid)
            else:
                md = frag.delete_rows(mine[fid].tolist())
                touched = True
                (kept.append(md) if md is not None else removed.append(fid))
        if removed or touched:  # Merge cannot drop fragments; an Update touching all of V conflicts the same
            op = commits.LO.Update(removed_fragment_ids=sorted(removed), updated_fragments=kept, new_fragments=new)
        else:
            op = commits.LO.Merge(kept + new, ds.schema)
        try:
            lance.LanceDataset.commit(uri, op, read_version=version, storage_options=opts)
            return True
        except CommitConflictError:
            commits.backoff(attempt)
    raise commits.CommitContentionError(f"{uri}: gave up replacing the rows of {sae_id!r} after "
                                        f"{commits.MAX_ATTEMPTS} conflicts with concurrent writers")


def build_atoms(store: Store, sae_id: str, top_n: int = DEFAULT_TOP_N, *, force: bool = False, C: int | None = None,
                batch_images: int = 64, chunk_rows: int = 1 << 21, index: bool = True,
                hook: Callable[[str], None] | None = None, max_restarts: int = 20) -> BuildResult:
    """(Re)build ``atom_images`` and ``atom_top`` of ``sae_id`` from all of its sae_codes rows (see the module
    docstring for why the result is exact whatever ran before or runs concurrently).

    Skips a table whose rows were built from the current sae_codes (and, for atom_top, with this ``top_n``)
    unless ``force``. Memory is bounded by ``batch_images`` images of codes, ``chunk_rows`` atom_images rows and
    the running top-N ((categories + 1) * C * top_n entries). ``C`` (dictionary size) only pre-sizes arrays.
    ``hook(stage)`` is called at "computed" and "committed:<table>" (fault injection in tests).
    """
    if top_n < 1:
        raise ValueError("top_n must be >= 1")
    t0 = time.perf_counter()
    for tbl in DERIVED:
        _derived(store, tbl)
    res = BuildResult(sae_id, top_n=top_n)
    for restart in range(max_restarts):
        src = source(store, sae_id)
        want = {IMAGES: (src.fingerprint, 0), TOP: (src.fingerprint, top_n)}
        need = [t for t in DERIVED if force or stamp(store, t, sae_id) != want[t]]
        res.images, res.restarts = src.n_images, restart
        if not need:
            break
        d = _Deriver(store, sae_id, src, top_n, IMAGES in need, TOP in need, C or 1, chunk_rows)
        if src.n_images:
            for b in src.dataset.to_batches(columns=[*SOURCE_COLUMNS, "indices", "values"],
                                            filter=where(sae_id=sae_id), batch_size=batch_images):
                d.add(b)
        d.flush()
        frags = {IMAGES: d.fragments}
        top = d.top_table() if TOP in need else None
        if top is not None:
            frags[TOP] = _write(store, TOP, top, 1 << 22)
        if hook:
            hook("computed")
        ok = True
        for t in need:
            ok = _replace(store, t, sae_id, frags[t], lambda: current_fingerprint(store, sae_id) == src.fingerprint)
            if not ok:
                break
            if hook:
                hook(f"committed:{t}")
        if ok:
            res.rebuilt, res.activations = tuple(need), d.activations
            res.atom_images_rows = d.rows if IMAGES in need else 0
            res.atom_top_rows = top.num_rows if top is not None else 0
            break
    else:
        raise commits.CommitContentionError(f"sae_codes of {sae_id!r} kept changing during {max_restarts} builds "
                                            "of atom_images/atom_top; re-run `spg encode` when the encodes finish")
    if index:
        ensure_atom_indexes(store)
    res.seconds = time.perf_counter() - t0
    return res


def ensure_atom_indexes(store: Store, rebuild: bool = False) -> dict[str, list[str]]:
    """Scalar indexes on atom_images / atom_top (BTree on atom; Bitmap on sae_id, scope, category); idempotent.

    Missing indexes are created; existing ones are brought up to date with rows committed since (incremental) or
    rebuilt from scratch with ``rebuild``. A concurrent commit makes Lance refuse an index commit: retried.
    Returns the indexed columns per table.
    """
    done: dict[str, list[str]] = {}
    for table in DERIVED:
        cols = [(c, kind) for (t, c), kind in ATOM_INDEXES.items() if t == table]
        done[table] = [c for c, _ in cols]
        for attempt in range(50):
            try:
                tbl = _derived(store, table)
                if tbl.count_rows() == 0:
                    break
                have = {cfg.columns[0]: cfg for cfg in tbl.list_indices()}
                stale = False
                for c, kind in cols:
                    if rebuild or c not in have:
                        tbl.create_index(c, config=kind(), replace=True)
                    else:
                        stale |= bool(getattr(have[c], "num_unindexed_rows", 0))
                if stale:
                    tbl.to_lance().optimize.optimize_indices()
                break
            except (CommitConflictError, OSError, RuntimeError) as e:  # lance reports conflicts as OSError too
                conflict = isinstance(e, CommitConflictError) or "onflict" in str(e)
                if not conflict or attempt == 49:
                    raise
                commits.backoff(attempt)
    return done


def _read_derived(store: Store, name: str, filt: str | None, columns: Sequence[str] | None) -> pa.Table | None:
    """One open and one (indexed) scan of a derived table; None when it is missing or of another schema version."""
    if not store.has_table(name):
        return None
    tbl = store.db.open_table(name)
    found = (tbl.schema.metadata or {}).get(VERSION_KEY)
    if found is not None and int(found) != load_schema(name).version:
        return None
    return tbl.to_lance().to_table(columns=None if columns is None else list(columns), filter=filt)


def read_top(store: Store, sae_id: str, atom: int, scope: str = ALL,
             columns: Sequence[str] = ("rank", "image_id", "category", "patch", "value", "top_n", "built_from")
             ) -> pa.Table | None:
    """atom_top rows of one (SAE, scope, atom): one indexed lookup (None: no current atom_top table)."""
    return _read_derived(store, TOP, where(sae_id=sae_id, scope=scope, atom=int(atom)), columns)


def read_images(store: Store, sae_id: str, atom: int | None = None, category: str | None = None,
                columns: Sequence[str] | None = None) -> pa.Table | None:
    """atom_images rows of an SAE (of one atom / category when given): one indexed lookup per atom (None: no
    current atom_images table)."""
    return _read_derived(store, IMAGES, where(sae_id=sae_id, atom=None if atom is None else int(atom),
                                              category=category), columns)


def iter_images(store: Store, sae_id: str, columns: Sequence[str], batch_size: int = 1 << 17):
    """Stream an SAE's atom_images rows (bounded memory)."""
    if not store.has_table(IMAGES):
        return
    yield from store.lance(IMAGES).to_batches(columns=list(columns), filter=where(sae_id=sae_id),
                                              batch_size=batch_size)


def iter_codes(store: Store, sae_id: str, columns: Sequence[str], image_ids: Sequence[str] | None = None,
               category: str | None = None, batch_size: int = 256):
    """Stream sae_codes rows of an SAE (of some images / a category), with ``indices`` and ``values``."""
    if not store.has_table(CODES):
        return
    filt = where(sae_id=sae_id, category=category,
                 image_id=None if image_ids is None else sorted(set(image_ids)))
    yield from store.lance(CODES).to_batches(columns=[*columns, "indices", "values"], filter=filt,
                                             batch_size=batch_size)


__all__ = ["ALL", "ATOM_INDEXES", "BuildResult", "CODES", "DEFAULT_TOP_N", "DERIVED", "IMAGES", "Source", "TOP",
           "activations", "build_atoms", "commit", "current_fingerprint", "encoded_image_ids", "ensure_atom_indexes",
           "fingerprint", "flat_codes", "grid_w", "iter_codes", "iter_images", "lance_uri", "read_images",
           "read_top", "readable", "source", "stamp", "top_per_atom"]
