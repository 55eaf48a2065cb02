"""Distributed extraction: dataset records -> Ray Data (decode -> backbone actor pool -> fragment writers)
-> ``patch_tokens``, ``images`` and ``errors`` in the store.

Token bytes never pass through the driver: writer tasks write Lance fragments next to the table and hand
back only their JSON descriptions, which the driver commits in batches (every ``commit_every_s`` seconds
and at the end). A crash loses at most the uncommitted window; a re-run skips every (image, layer) already
stored, so it writes only what is missing and never a duplicate.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import pyarrow as pa
from tqdm.auto import tqdm

from spg_dist.backbones import check_weights, get_config, resolve_layers
from spg_dist.data.records import ImageRecord
from spg_dist.data.spec import list_records
from spg_dist.ray.extract_ops import (PASS_COLUMNS, RECORD_COLUMNS, EncodeActor, decode_batch,
                                      write_fragment_batch)
from spg_dist.ray.replan import ACTOR_ARGS, MAX_REPLANS, actor_args_allowed, alive_nodes, node_lost, note_replan, settle
from spg_dist.ray.runtime import cluster_gpus, ensure_ray
from spg_dist.store import Store, images, tokens

log = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    backbone_id: str
    layers: list[int]
    images_listed: int
    images_skipped: int  # already complete in the store
    rows_written: int
    errors: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    token_bytes: int = 0  # fp16 token bytes written
    write_seconds: float = 0.0  # summed over fragment writers (they run in parallel)
    duplicates_removed: int = 0  # rows of keys stored twice (by an older version), removed before extracting
    images_restored: int = 0  # images rows restored for tokens that had none
    replans: int = 0  # runs again on the nodes left after a node was lost

    @property
    def images_per_s(self) -> float:
        done = self.images_listed - self.images_skipped
        return done / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (f"{self.backbone_id} layers {self.layers}: {self.rows_written} patch_tokens rows written, "
                f"{self.images_skipped} images already stored, {len(self.errors)} errors, "
                f"{self.seconds:.1f} s ({self.images_per_s:.1f} images/s)")


def backbone_id_for(backbone: str, weights: str | None, token: str = "block") -> str:
    """Rows are keyed by this id, so tokens of other weights (``@<weights folder>``) or of the other token choice
    (``+norm``: after the model's final norm) under the same architecture never collide."""
    bid = backbone if not weights else f"{backbone}@{os.path.basename(os.path.normpath(weights))}"
    return f"{bid}+norm" if token == "norm" else bid


def extract(store: str | Store, dataset: str, backbone: str, *, weights: str | None = None,
            layers: Sequence[int] | None = None, image_size: int | None = None,
            categories: Sequence[str] | None = None, backbone_id: str | None = None,
            batch_size: int = 16, num_actors: int = 1, gpus_per_actor: float | None = None,
            cpus_per_actor: float = 1.0, rows_per_fragment: int | None = None, commit_every_s: float = 30.0,
            address: str | None = None, num_cpus: int | None = None, progress: bool = True,
            corruptions: int = 0, token: str = "block", max_pixels: int | None = None,
            records: Sequence[ImageRecord] | None = None,
            on_rows: Callable[[int], None] | None = None,
            hook: Callable[[str], None] | None = None) -> ExtractResult:
    """Extract patch tokens of ``dataset`` (``mvtec:PATH`` | ``visa:PATH`` | ``folder:PATH``) into ``store``.

    ``gpus_per_actor`` None means one GPU per actor when the cluster has GPUs, CPU actors otherwise.
    ``corruptions`` N > 0 also stores the tokens of N CutPaste-corrupted copies of every normal train image
    (``<image_id>#cutpaste<j>``, paired with the clean image by ``source_image_id``; masks in ``corruptions``).
    ``token``: ``block`` (each chosen block's output) or ``norm`` (after the model's final norm, what DINOv3's
    ``last_hidden_state`` and open_clip's ``ln_post`` give; stored as backbone id ``<name>+norm``).
    ``max_pixels``: images whose header claims more pixels are an ``errors`` row, never decoded (default
    ``$SPG_MAX_IMAGE_PIXELS`` or 64 M); passed to every worker, so a cluster needs no environment for it.
    ``on_rows(n)`` after every n (image, layer) rows the pipeline delivered (progress, benchmarks);
    ``hook("committed")`` after each commit (fault injection in tests).

    Nothing left to do (every (image, layer) stored): returns without starting Ray. Interrupted (Ctrl-C, a failed
    task): the fragments already written are committed before the exception propagates, so a re-run extracts only
    the rest. A lost node: the same, then the rest is planned again on the nodes alive (:mod:`spg_dist.ray.replan`).
    """
    t0 = time.perf_counter()
    store = store if isinstance(store, Store) else Store(store)
    config = get_config(backbone)  # unknown name -> one line listing the known ones, before Ray starts
    check_weights(backbone, weights)  # wrong weights fail here, not in every actor of the pool
    size = image_size or config.image_size
    recs = list(records) if records is not None else list_records(dataset, categories=categories)
    if corruptions < 0:
        raise ValueError(f"corruptions must be >= 0, got {corruptions}")
    items_all = [{**{k: getattr(r, k) for k in RECORD_COLUMNS}, "source_image_id": "", "corruption": 0} for r in recs]
    items_all += [{**{k: getattr(r, k) for k in RECORD_COLUMNS}, "image_id": corrupted_id(r.image_id, j), "label": 1,
                   "defect_type": "cutpaste", "mask_uri": "", "source_image_id": r.image_id, "corruption": j}
                  for r in recs if r.split == "train" and r.label == 0 for j in range(1, corruptions + 1)]
    from spg_dist.store.tokens import TOKEN_CHOICES

    if token not in TOKEN_CHOICES:
        raise ValueError(f"token must be one of {TOKEN_CHOICES}, not {token!r}")
    if token == "norm" and config.family == "classical":
        from spg_dist.backbones import NoFinalNormError

        raise NoFinalNormError(f"backbone {backbone!r} has no final norm: extract it with --token block")
    bid = backbone_id or backbone_id_for(backbone, weights, token)
    layer_list = sorted(set(resolve_layers(layers, config.num_layers, backbone)))

    result = ExtractResult(bid, layer_list, len(items_all), 0, 0)
    run = dict(store=store, bid=bid, backbone=backbone, weights=weights, layer_list=layer_list, size=size,
               config=config, token=token, batch_size=batch_size, num_actors=num_actors,
               gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor, rows_per_fragment=rows_per_fragment,
               commit_every_s=commit_every_s, address=address, num_cpus=num_cpus, progress=progress,
               max_pixels=max_pixels, on_rows=on_rows, hook=hook, result=result)
    for replan in range(MAX_REPLANS + 1):
        todo, partial = _plan(store, bid, layer_list, items_all, recs, result, first=replan == 0)
        if not todo:
            break
        ensure_ray(address, num_cpus)
        alive = alive_nodes()  # before this run: the count a lost node lowers
        try:
            _run_pipeline(todo, partial, **run)
            break
        except Exception as e:  # a lost node: commit happened in _run_pipeline; run again on what is left
            if not node_lost(e) or replan == MAX_REPLANS:
                raise
            settle(alive)
            left, _ = _plan(store, bid, layer_list, items_all, recs, result, first=False)
            note_replan(f"extract {bid}", e, len({it["image_id"] for it in left}), replan + 1)
            result.replans += 1
    if result.rows_written:
        tokens.compact(store)  # the run's small fragments into few files (a concurrent writer only makes this a no-op)
    for e in result.errors:
        log.warning("%s: %s", e["stage"], e["reason"])
    result.seconds = time.perf_counter() - t0
    return result


def _plan(store: Store, bid: str, layer_list: list[int], items_all: list[dict], recs: list[ImageRecord],
          result: ExtractResult, first: bool) -> tuple[list[dict], frozenset]:
    """What is left to extract (every (image, layer) not stored yet) and the (image, layer) pairs of partly stored
    images; on the first plan also repairs what an older version left (duplicates, missing images rows)."""
    existing = tokens.stored_keys(store, bid, layer_list)
    have: dict[str, set[int]] = {}
    for _, layer, image_id in existing:
        have.setdefault(image_id, set()).add(int(layer))
    todo = [it for it in items_all if not have.get(it["image_id"], set()) >= set(layer_list)]
    partial = frozenset((it["image_id"], layer) for it in todo for layer in have.get(it["image_id"], ()))
    if not first:
        return todo, partial
    result.images_skipped = len(items_all) - len(todo)
    result.duplicates_removed = tokens.dedupe(store, bid, layer_list, expected=len(existing))  # an older version's
    # tokens whose images rows are missing (a crash between two commits of an older version): restore those rows
    # from the records without re-extracting, so their masks never read as "all normal"
    done_ids = [r.image_id for r in recs if r.image_id in have]
    missing = sorted(set(done_ids) - images.stored_ids(store, done_ids)) if done_ids else []
    if missing:
        result.images_restored = images.upsert(store, [_image_row(r) for r in recs if r.image_id in set(missing)])
    return todo, partial


def _run_pipeline(todo: list[dict], partial: frozenset, *, store: Store, bid: str, backbone: str,
                  weights: str | None, layer_list: list[int], size: int, config, token: str, batch_size: int,
                  num_actors: int, gpus_per_actor: float | None, cpus_per_actor: float,
                  rows_per_fragment: int | None, commit_every_s: float, address: str | None, num_cpus: int | None,
                  progress: bool, max_pixels: int | None, on_rows: Callable[[int], None] | None,
                  hook: Callable[[str], None] | None, result: ExtractResult) -> None:
    """One Ray Data run over ``todo``, sized to the cluster as it is now; commits what was written even when it
    fails (a lost node, Ctrl-C)."""
    import ray

    ensure_ray(address, num_cpus)
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if cluster_gpus() >= 1 else 0.0
    num_actors = fit_actors(num_actors, cpus_per_actor, gpus_per_actor)
    device = "cuda" if gpus_per_actor > 0 else "cpu"
    task_cpus, cpus_per_actor = fit_cpus(num_actors, cpus_per_actor, gpus_per_actor > 0)
    lance_uri = tokens.lance_uri(store)
    if rows_per_fragment is None:
        # at most ~64 MB per fragment (bounded writer memory), and no more than a few backbone batches, so rows reach
        # a commit window soon after they are encoded: --commit-every bounds what a crash loses even on a slow
        # backbone (small fragments are merged by the compaction at the end of the run)
        row_bytes = config.grid[0] * config.grid[1] * config.dim * 2 * (size / config.image_size) ** 2
        by_size = int(64e6 // max(row_bytes, 1))
        by_time = batch_size * max(1, int(commit_every_s // 10))
        rows_per_fragment = int(max(batch_size, min(4096, by_size, by_time)))

    # one block per backbone batch (at most 512): blocks flow through decode, the actors and the writers one by one,
    # so the bar moves from the first batch on instead of waiting for a few huge blocks
    ds = ray.data.from_items(todo, override_num_blocks=max(1, min(-(-len(todo) // batch_size), 512)))
    from spg_dist.data.imageio import resolve_max_pixels

    ds = ds.map_batches(decode_batch, fn_kwargs={"image_size": size, "resample": config.preprocess.resample,
                                                 "max_pixels": resolve_max_pixels(max_pixels)},
                        batch_size=batch_size,
                        batch_format="numpy", num_cpus=task_cpus)
    actor_args = dict(backbone=backbone, weights=weights, layers=layer_list, image_size=size, backbone_id=bid, token=token,
                      device=device, torch_threads=None if device == "cuda" else max(1, int(cpus_per_actor)))
    resources = {"num_gpus": gpus_per_actor} if gpus_per_actor > 0 else {"num_cpus": cpus_per_actor}
    with actor_args_allowed():
        ds = ds.map_batches(EncodeActor, fn_constructor_kwargs=actor_args, batch_size=batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=num_actors), **resources, **ACTOR_ARGS)
    ds = ds.map_batches(write_fragment_batch, fn_kwargs=dict(lance_uri=lance_uri, skip=partial,
                                                             storage_options=store.storage_options),
                        batch_size=rows_per_fragment, batch_format="pyarrow", num_cpus=task_cpus)

    pending: list[str] = []
    image_rows: dict[str, dict] = {}
    corruption_rows: dict[str, dict] = {}
    errors: dict[tuple, dict] = {}
    last_commit = time.monotonic()
    bar = tqdm(total=len(todo) * len(layer_list), unit="row", desc=f"extract {bid}", disable=not progress)

    def commit() -> None:
        # images/corruptions/errors rows first, tokens last: a crash between the two leaves images rows without
        # tokens (a re-run extracts them), never tokens without their images rows (masks would read as normal)
        nonlocal pending, last_commit
        if image_rows:
            images.upsert(store, list(image_rows.values()))
        if corruption_rows:
            images.upsert_corruptions(store, list(corruption_rows.values()))
        if errors:
            images.upsert_errors(store, list(errors.values()))
        result.rows_written += tokens.commit(store, pending)
        result.errors.extend(errors.values())
        committed = bool(pending)
        pending, last_commit = [], time.monotonic()
        image_rows.clear()
        corruption_rows.clear()
        errors.clear()
        if hook and committed:
            hook("committed")

    bar.set_postfix_str(f"starting {num_actors} backbone actor(s)")  # until the first rows: what the wait is
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            _collect(batch, bid, size, pending, image_rows, corruption_rows, errors, result)
            if bar.postfix:
                bar.set_postfix_str("", refresh=False)
            bar.update(batch.num_rows)
            if on_rows:
                on_rows(batch.num_rows)
            if time.monotonic() - last_commit >= commit_every_s:
                commit()
    finally:
        commit()  # on Ctrl-C or a failed task too: whatever was written so far is kept
        bar.close()


def fit_actors(num_actors: int, cpus_per_actor: float, gpus_per_actor: float) -> int:
    """How many backbone actors to start on the cluster as it is now: GPU actors no more than its GPUs hold (a pool
    waiting for a GPU that a lost node took would wait forever); CPU actors shrink their CPUs instead
    (:func:`fit_cpus`)."""
    import ray

    if gpus_per_actor <= 0:
        return num_actors
    fits = max(1, int(float(ray.cluster_resources().get("GPU", 0.0)) // gpus_per_actor))
    if fits < num_actors:
        log.warning("%d backbone actors of %g GPU asked; the cluster has GPUs for %d: starting %d", num_actors,
                    gpus_per_actor, fits, fits)
    return min(num_actors, fits)


def fit_cpus(num_actors: int, cpus_per_actor: float, gpu: bool) -> tuple[float, float]:
    """(CPUs per decode/write task, CPUs per backbone actor) that fit the cluster: an actor pool that takes every
    CPU leaves none for the decode and write tasks, and the pipeline would wait forever (one CPU, one actor)."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    task = 0.5 if total >= 2 else 0.25
    if gpu:
        return task, cpus_per_actor
    room = max(0.25, (total - 2 * task) / max(1, num_actors))
    if cpus_per_actor > room:
        log.info("backbone actors get %.2f CPU each (of %.1f asked): the cluster has %.0f CPUs and decode/write "
                 "tasks need some", room, cpus_per_actor, total)
    return task, min(cpus_per_actor, room)


def _image_row(r: ImageRecord) -> dict:
    from spg_dist.data.imageio import ImageDecodeError, image_size

    try:
        width, height = image_size(r.image_uri)
    except ImageDecodeError:
        width, height = 0, 0
    return {**{k: getattr(r, k) for k in RECORD_COLUMNS}, "width": width, "height": height}


def corrupted_id(image_id: str, j: int) -> str:
    """The key of the j-th corrupted copy of an image."""
    return f"{image_id}#cutpaste{j}"


def _collect(batch: pa.Table, bid: str, size: int, pending: list[str], image_rows: dict, corruption_rows: dict,
             errors: dict, result: ExtractResult) -> None:
    now = pa.scalar(time.time() * 1e6, pa.int64()).cast(pa.timestamp("us")).as_py()
    for extra in batch.column("fragments").to_pylist():
        if extra:
            info = json.loads(extra)
            pending.extend(info["fragments"])
            result.token_bytes += info["bytes"]
            result.write_seconds += info["seconds"]
    for row in batch.select([*PASS_COLUMNS, "written"]).to_pylist():
        if row["error"]:
            errors[(row["error_stage"], bid, row["image_id"])] = dict(
                stage=row["error_stage"], backbone=bid, image_id=row["image_id"], dataset=row["dataset"],
                uri=row["image_uri"], reason=row["error"], created_at=now)
            continue
        if row["source_image_id"]:
            from spg_dist.data.corruptions import corruption_seed

            corruption_rows[row["image_id"]] = dict(
                image_id=row["image_id"], source_image_id=row["source_image_id"], dataset=row["dataset"],
                category=row["category"], kind="cutpaste-union",
                seed=corruption_seed(row["source_image_id"], int(row["corruption"])), image_size=size,
                mask_png=row["corruption_png"], created_at=now)
            continue
        if row["mask_error"]:
            errors[("mask", "", row["image_id"])] = dict(
                stage="mask", backbone="", image_id=row["image_id"], dataset=row["dataset"],
                uri=row["mask_uri"] or row["image_uri"], reason=row["mask_error"], created_at=now)
        image_rows[row["image_id"]] = {k: row[k] for k in (*RECORD_COLUMNS, "width", "height")}
