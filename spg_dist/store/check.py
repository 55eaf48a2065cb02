"""``spg store check [--repair]``: what state the store is in, table by table and across tables, and the repairs
that are safe to make.

Per table: the schema version it was written with (and whether this code reads it), the Lance format and version,
rows, distinct keys against rows (duplicates an older version or a foreign writer left), data files no version
references (what a killed writer leaves: removable once older than a grace period, so an in-flight writer's files are
never touched), and data files that cannot be opened or are shorter than their manifest says (a truncated upload),
named by table and file. Across tables: tokens without an ``images`` row (their masks would read as all normal),
codes without tokens, ``atom_top`` rows of SAEs without codes.

``--repair`` removes duplicates (one commit per table, the first row of each key kept), removes orphan files past the
grace period, drops damaged fragments when asked (``drop_damaged``: their rows are lost, a re-run of the stage that
wrote them restores them), compacts and cleans old versions. What it cannot fix it says, with the command that can.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from spg_dist.store.connection import Store
from spg_dist.store.filters import where
from spg_dist.store.schemas import VERSION_KEY, known_tables, load_schema, table_families

GRACE_SECONDS = 3600.0  # an unreferenced data file younger than this may belong to a writer that is still running


@dataclass
class TableReport:
    name: str
    schema_version: int | None
    code_version: int | None
    lance_version: int
    data_format: str
    rows: int
    distinct_keys: int | None
    orphan_files: list[str] = field(default_factory=list)
    young_orphans: int = 0
    damaged: list[str] = field(default_factory=list)  # "fragment N: file: why"

    @property
    def duplicates(self) -> int:
        return 0 if self.distinct_keys is None else self.rows - self.distinct_keys

    @property
    def ok(self) -> bool:
        return (not self.duplicates and not self.orphan_files and not self.damaged
                and (self.code_version is None or self.schema_version == self.code_version))

    def line(self) -> str:
        keys = "" if self.distinct_keys is None else f", {self.distinct_keys} keys"
        issues = []
        if self.code_version is not None and self.schema_version != self.code_version:
            issues.append(f"schema v{self.schema_version}, this code reads v{self.code_version}")
        if self.duplicates:
            issues.append(f"{self.duplicates} duplicate rows")
        if self.orphan_files:
            issues.append(f"{len(self.orphan_files)} orphan files")
        if self.damaged:
            issues.append(f"{len(self.damaged)} damaged data files")
        state = "ok" if not issues else "; ".join(issues)
        return (f"{self.name:22s} schema v{self.schema_version} lance v{self.lance_version} ({self.data_format}) "
                f"{self.rows} rows{keys}: {state}")


@dataclass
class CheckReport:
    store: str
    tables: list[TableReport]
    cross: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    not_repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tables) and not self.cross

    def lines(self) -> list[str]:
        out = [t.line() for t in self.tables] + [f"cross-table: {c}" for c in self.cross]
        out += [f"repaired: {r}" for r in self.repaired] + [f"not repaired: {r}" for r in self.not_repaired]
        return out


def _fs(uri: str, storage_options: dict | None):
    """(filesystem, path) for listing a table's files: the local disk, or pyarrow's S3/GCS file systems."""
    import pyarrow.fs as pafs

    if "://" not in uri or uri.startswith("file://"):
        return pafs.LocalFileSystem(), uri.removeprefix("file://")
    if uri.startswith("s3://"):
        opts = storage_options or {}
        fs = pafs.S3FileSystem(access_key=opts.get("aws_access_key_id"), secret_key=opts.get("aws_secret_access_key"),
                               region=opts.get("aws_region") or opts.get("region"),
                               endpoint_override=opts.get("aws_endpoint") or opts.get("endpoint"),
                               scheme="http" if str(opts.get("allow_http", "")).lower() == "true" else "https")
        return fs, uri[len("s3://"):]
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


def _referenced_files(ds) -> set[str]:
    """Data and deletion files any kept version of the table references (a file of an old version is not an
    orphan: cleanup_old_versions owns those)."""
    refs: set[str] = set()
    for v in ds.versions():
        for frag in ds.checkout_version(v["version"]).get_fragments():
            md = frag.metadata
            refs.update(d.path for d in md.data_files())
    return refs


def _damaged(ds, storage_options: dict | None) -> list[tuple[int, str, str]]:
    """(fragment id, file, why) of data files that are missing, shorter than the manifest says, or unreadable."""
    from lance.file import LanceFileReader

    fs, root = _fs(ds.uri, storage_options)
    out = []
    for frag in ds.get_fragments():
        for d in frag.metadata.data_files():
            path = f"{root.rstrip('/')}/data/{d.path}"
            try:
                info = fs.get_file_info(path)
                if info.type.name == "NotFound":
                    out.append((frag.fragment_id, d.path, "missing"))
                    continue
                want = getattr(d, "file_size_bytes", None)
                if want and info.size is not None and info.size < want:
                    out.append((frag.fragment_id, d.path, f"truncated: {info.size} of {want} bytes"))
                    continue
                LanceFileReader(f"{ds.uri.rstrip('/')}/data/{d.path}", storage_options=storage_options).metadata()
            except Exception as e:  # noqa: BLE001 - any failure to open is what we report
                out.append((frag.fragment_id, d.path, f"unreadable: {type(e).__name__}: {str(e).splitlines()[0][:120]}"))
    return out


def _orphans(ds, storage_options: dict | None, grace: float) -> tuple[list[str], int]:
    fs, root = _fs(ds.uri, storage_options)
    import pyarrow.fs as pafs

    try:
        infos = fs.get_file_info(pafs.FileSelector(f"{root.rstrip('/')}/data", allow_not_found=True))
    except OSError:
        return [], 0
    refs = _referenced_files(ds)
    now = time.time()
    old, young = [], 0
    for info in infos:
        name = info.path.rsplit("/", 1)[-1]
        if info.type.name != "File" or name in refs:
            continue
        mtime = info.mtime.timestamp() if info.mtime else 0.0
        if now - mtime >= grace:
            old.append(name)
        else:
            young += 1
    return sorted(old), young


def _table_report(store: Store, name: str, grace: float) -> TableReport:
    tbl = store.db.open_table(name)
    ds = tbl.to_lance()
    meta = ds.schema.metadata or {}
    found = int(meta[VERSION_KEY]) if VERSION_KEY in meta else None
    family = name.split("_")[0] + "_" + name.split("_")[1] if name.startswith("knn_bank_") else name
    try:
        schema = load_schema(family) if family in known_tables() else None
    except Exception:  # noqa: BLE001
        schema = None
    code = schema.version if schema else None
    key = list(schema.key) if schema else None
    rows = ds.count_rows()
    distinct = None
    damaged = [f"fragment {f}: {p}: {why}" for f, p, why in _damaged(ds, store.storage_options)]
    if key and not damaged:
        keys = ds.to_table(columns=key)
        distinct = keys.group_by(key).aggregate([]).num_rows if keys.num_rows else 0
    orphans, young = _orphans(ds, store.storage_options, grace)
    fmt = getattr(ds, "data_storage_version", "") or ""
    return TableReport(name, found, code, ds.version, str(fmt), rows, distinct, orphans, young, damaged)


def _cross(store: Store, damaged: set[str] = frozenset()) -> list[str]:
    out = []
    names = set(store.db.list_tables().tables) - set(damaged)  # a damaged table is reported on its own
    if "patch_tokens" in names and "images" in names:
        tok = store.read("patch_tokens", where=where(source_image_id=""), columns=["image_id"])
        ids = set(tok.column("image_id").to_pylist())
        have = set(store.read("images", columns=["image_id"]).column("image_id").to_pylist())
        missing = ids - have
        if missing:
            out.append(f"{len(missing)} images with tokens but no images row (e.g. {sorted(missing)[0]}): re-run "
                       f"`spg extract` on their dataset (it restores the rows without re-extracting)")
    if "sae_codes" in names and "sae_models" in names and "patch_tokens" in names:
        models = {r["sae_id"]: (r["backbone"], r["layer"]) for r in
                  store.read("sae_models", columns=["sae_id", "backbone", "layer"]).to_pylist()}
        codes = store.read("sae_codes", columns=["sae_id", "image_id"])
        tok = store.read("patch_tokens", columns=["backbone", "layer", "image_id"])
        have = set(zip(tok.column("backbone").to_pylist(), tok.column("layer").to_pylist(),
                       tok.column("image_id").to_pylist()))
        orphan = [(s, i) for s, i in zip(codes.column("sae_id").to_pylist(), codes.column("image_id").to_pylist())
                  if s in models and (*models[s], i) not in have]
        if orphan:
            out.append(f"{len(orphan)} sae_codes rows without their tokens (e.g. {orphan[0][1]} of {orphan[0][0]})")
    if "atom_top" in names and "sae_codes" in names:
        top_saes = set(store.read("atom_top", columns=["sae_id"]).column("sae_id").to_pylist())
        code_saes = set(store.read("sae_codes", columns=["sae_id"]).column("sae_id").to_pylist())
        stray = top_saes - code_saes
        if stray:
            out.append(f"atom_top rows of {len(stray)} SAE(s) without codes ({sorted(stray)[0]}): run `spg encode`")
    return out


def check(store: Store | str, repair: bool = False, drop_damaged: bool = False, grace_seconds: float = GRACE_SECONDS,
          echo: Callable[[str], None] = lambda _: None) -> CheckReport:
    """Check every table of the store (and, with ``repair``, fix what is safe to fix); see the module docstring."""
    store = store if isinstance(store, Store) else Store(store)
    names = sorted(store.db.list_tables().tables)
    report = CheckReport(store.uri, [_table_report(store, n, grace_seconds) for n in names])
    report.cross = _cross(store, {t.name for t in report.tables if t.damaged})
    if not repair:
        return report
    for t in report.tables:
        ds = store.db.open_table(t.name).to_lance()
        if t.damaged:
            if drop_damaged:
                bad = {int(d.split(":")[0].split()[1]) for d in t.damaged}
                _drop_fragments(ds, bad, store.storage_options)
                report.repaired.append(f"{t.name}: dropped {len(bad)} damaged fragment(s); re-run the stage that "
                                       f"wrote them to restore their rows")
            else:
                report.not_repaired.append(f"{t.name}: {len(t.damaged)} damaged data file(s) ({t.damaged[0]}); "
                                           f"`spg store check --repair --drop-damaged` drops them (their rows are "
                                           f"lost until the stage that wrote them runs again)")
                continue
        if t.duplicates:
            removed = store.dedupe(t.name)
            report.repaired.append(f"{t.name}: removed {removed} duplicate row(s)")
        if t.orphan_files:
            fs, root = _fs(ds.uri, store.storage_options)
            for name in t.orphan_files:
                fs.delete_file(f"{root.rstrip('/')}/data/{name}")
            report.repaired.append(f"{t.name}: removed {len(t.orphan_files)} orphan data file(s)")
        ds = store.db.open_table(t.name).to_lance()
        ds.optimize.compact_files()
        ds.cleanup_old_versions(older_than=_dt.timedelta(seconds=grace_seconds))
    report.repaired.append("compacted every table and removed versions older than the grace period")
    for c in _cross(store, {t.name for t in report.tables if t.damaged and not drop_damaged}):
        report.not_repaired.append(c)
    echo("\n".join(report.lines()))
    return report


def _drop_fragments(ds, fragment_ids: set[int], storage_options: dict | None) -> None:
    import lance

    from spg_dist.store import commits

    for attempt in range(commits.MAX_ATTEMPTS):
        ds = lance.dataset(ds.uri, storage_options=storage_options)
        kept = [f.metadata for f in ds.get_fragments() if f.fragment_id not in fragment_ids]
        try:
            lance.LanceDataset.commit(ds.uri, lance.LanceOperation.Update(
                removed_fragment_ids=sorted(fragment_ids), updated_fragments=kept, new_fragments=[]),
                read_version=ds.version, storage_options=storage_options)
            return
        except lance.commit.CommitConflictError:
            commits.backoff(attempt)


def describe_tables(store: Store | str) -> list[dict[str, Any]]:
    """What ``spg store`` prints: per table rows, schema version (written / read by this code), Lance version."""
    store = store if isinstance(store, Store) else Store(store)
    out = []
    have = set(store.db.list_tables().tables)
    for name in known_tables() + sorted(n for n in have if any(n.startswith(f + "_") for f in table_families())):
        if name not in have:
            out.append({"table": name, "rows": None})
            continue
        ds = store.db.open_table(name).to_lance()
        meta = ds.schema.metadata or {}
        out.append({"table": name, "rows": ds.count_rows(), "lance_version": ds.version,
                    "schema_version": int(meta[VERSION_KEY]) if VERSION_KEY in meta else None,
                    "code_version": load_schema(name).version if name in known_tables() else None})
    return out


__all__ = ["CheckReport", "GRACE_SECONDS", "TableReport", "check", "describe_tables"]
