"""``spg sweep``: a plan's trials run concurrently on a Ray cluster, shared work done once, state in the store.

Why Ray tasks and not Ray Tune: a sweep here is not a set of independent trials. One SAE data pass trains every
(C, k, sparsifier) cell of a (backbone, layer, aux dataset, seed) group, every guide and pooling setting reuses that
SAE, and extraction is shared by every trial of a (backbone, token, dataset). Tune's trial model would either retrain
the SAE per trial or need the sharing built around it; its search algorithms and schedulers are of no use for a
fixed grid. So the engine is a small DAG: extraction once in the driver (Ray Data), then one Ray task per trial
group (``num_cpus``/``num_gpus`` from the plan, fractional GPUs for single-worker groups, SPREAD over the nodes),
each training its SAEs in one pass in its own process and evaluating its trials one by one. Progress and results
live in ``sweep_trials`` and ``eval_results``, so a re-run skips finished trials, retries failed ones, and starts no
Ray at all when nothing is left; a failed trial is recorded and stops nothing else; a task lost with its node is
retried by Ray on another node and resumes from the store.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from spg_dist.stages.evaluate import utc_now
from spg_dist.stages.plans import PlanError, SweepPlan, Trial, guide_config
from spg_dist.store import Store, sweeps, tokens
from spg_dist.store.tokens import TokenSelection

Echo = Callable[[str], None]


@dataclass
class SweepResult:
    sweep_id: str
    trials: int
    finished: int
    failed: int
    skipped: int
    seconds: float
    nodes: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"sweep {self.sweep_id}: {self.trials} trials, {self.finished} finished, {self.failed} failed, "
                f"{self.skipped} already done; {len(set(self.nodes))} node(s); {self.seconds:.1f} s")


def trial_run(sweep_id: str, trial: Trial) -> str:
    return f"sweep/{sweep_id}/{trial.trial_id}"


def _row(sweep_id: str, t: Trial, **kw: Any) -> dict[str, Any]:
    base = dict(sweep_id=sweep_id, trial_id=t.trial_id, group_id=t.group_id, detector=t.detector,
                config=json.dumps(t.config, sort_keys=True, default=str), status="pending", attempt=0, node_id="",
                run="", sae_id="", guide_id="", start=None, end=None, error="")
    base.update(kw)
    return base


def token_backbone(trial_cfg: dict[str, Any], weights: dict[str, str] | None = None) -> str:
    """The id the tokens of a trial's backbone, weights and token choice are stored under."""
    from spg_dist.ray.extract import backbone_id_for

    b = trial_cfg["backbone"]
    return backbone_id_for(b, (weights or {}).get(b), trial_cfg.get("token", "block"))


def prepare(store: Store, plan: SweepPlan, echo: Echo, address: str | None = None,
            num_cpus: int | None = None) -> None:
    """Extraction once per (backbone, token choice, dataset) the plan needs and the store lacks; a dataset with no
    tokens and no ``data:`` entry to extract from is refused before any trial starts."""
    from spg_dist.data.spec import parse_dataset_spec

    needed = sorted({(t.config["backbone"], t.config.get("token", "block"), ds) for t in plan.trials()
                     for ds in (t.config["aux"], t.config["target"])
                     if t.detector != "visualad" or ds == t.config["aux"]})
    missing = []
    for backbone, token, ds in needed:
        bid = token_backbone({"backbone": backbone, "token": token}, plan.weights)
        have = tokens.metadata(store, TokenSelection.of(bid, None, dataset=ds), ["image_id"]).num_rows
        if not have:
            if ds not in plan.data:
                raise PlanError(f"no {bid} tokens of dataset {ds!r} in {store.uri} and no data: entry to extract "
                                f"it from; add `{ds}: LAYOUT:PATH` under data: (or run `spg extract` first)")
            parse_dataset_spec(plan.data[ds], name=ds)  # a missing path fails here, in one line
            missing.append((backbone, token, ds))
    if not missing:
        return
    from spg_dist.ray.extract import extract

    corruptions = 2 if "foundad" in plan.grid.detectors else 0
    for backbone, token, ds in missing:
        spec = plan.data[ds]
        if "@" not in spec.split(":", 1)[1]:
            spec = f"{spec}@{ds}"
        r = extract(store, spec, backbone, weights=plan.weights.get(backbone), token=token, corruptions=corruptions,
                    address=address, num_cpus=num_cpus, progress=False)
        echo(f"[extract] {r.summary()}")


def check_resources(plan: SweepPlan) -> None:
    """Refuse, before any trial, a per-group request no node of the cluster can satisfy."""
    import ray

    r = plan.resources
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits = [n for n in nodes if n["Resources"].get("CPU", 0) >= r.cpus and n["Resources"].get("GPU", 0) >= r.gpus]
    if not fits:
        have = ", ".join(f"{n['Resources'].get('CPU', 0):g} CPU/{n['Resources'].get('GPU', 0):g} GPU" for n in nodes)
        raise PlanError(f"resources: no node can run a trial group with {r.cpus:g} CPU and {r.gpus:g} GPU "
                        f"(nodes: {have or 'none'}); lower resources.cpus/gpus")


def run_sweep(store: Store | str, plan: SweepPlan, *, address: str | None = None, num_cpus: int | None = None,
              retry_failed: bool = True, echo: Echo = print, progress: bool = True) -> SweepResult:
    """Run every unfinished trial of ``plan`` (see the module docstring)."""
    t0 = time.perf_counter()
    store = store if isinstance(store, Store) else Store(store)
    trials = plan.trials()
    done = sweeps.trials(store, plan.name, columns=["trial_id", "status", "node_id"])
    status = dict(zip(done.column("trial_id").to_pylist(), done.column("status").to_pylist()))
    nodes = [n for n, s in zip(done.column("node_id").to_pylist(), done.column("status").to_pylist())
             if s == "finished"]
    todo = [t for t in trials if status.get(t.trial_id) != "finished"
            and (retry_failed or status.get(t.trial_id) != "failed")]
    skipped = len(trials) - len(todo)
    if not todo:  # nothing left: no Ray, no extraction, seconds
        return SweepResult(plan.name, len(trials), 0, 0, skipped, time.perf_counter() - t0, nodes)
    sweeps.upsert(store, [_row(plan.name, t, attempt=0) for t in todo if t.trial_id not in status])

    from spg_dist.ray.runtime import ensure_ray

    ensure_ray(address, num_cpus)
    check_resources(plan)
    prepare(store, plan, echo, address, num_cpus)
    from tqdm.auto import tqdm

    groups: dict[str, list[Trial]] = {}
    for t in todo:
        groups.setdefault(t.group_id, []).append(t)
    r = plan.resources
    task = run_group.options(num_cpus=r.cpus, num_gpus=r.gpus, scheduling_strategy="SPREAD", max_retries=3,
                             retry_exceptions=False)
    pending = {task.remote(store.uri, store.storage_options, plan.name, plan.to_dict(),
                           [dict(trial_id=t.trial_id, group_id=t.group_id, detector=t.detector, config=t.config)
                            for t in g]): gid for gid, g in groups.items()}
    result = SweepResult(plan.name, len(trials), 0, 0, skipped, 0.0, nodes)
    bar = tqdm(total=len(todo), unit="trial", desc=f"sweep {plan.name}", disable=not progress)
    try:
        _collect_groups(store, plan, groups, pending, result, bar)
    finally:  # Ctrl-C: every trial finished so far is in sweep_trials already; a re-run does the rest
        bar.close()
    result.seconds = time.perf_counter() - t0
    return result


def _collect_groups(store: Store, plan: SweepPlan, groups: dict, pending: dict, result: SweepResult, bar) -> None:
    import ray

    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        ref = ready[0]
        gid = pending.pop(ref)
        try:
            outcome = ray.get(ref)
        except Exception as e:  # the whole group died (e.g. its node, beyond Ray's retries): record, go on
            outcome = {t.trial_id: {"status": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
                       for t in groups[gid]}
            sweeps.upsert(store, [_row(plan.name, t, status="failed", error=outcome[t.trial_id]["error"], end=utc_now())
                                  for t in groups[gid]])
        for tid, o in outcome.items():
            if o["status"] == "finished":
                result.finished += 1
                result.nodes.append(o.get("node_id", ""))
            else:
                result.failed += 1
                result.errors[tid] = o.get("error", "")
            bar.update()


def _group_fn(store_uri: str, storage_options: dict | None, sweep_id: str, plan_dict: dict, trials: list[dict]
              ) -> dict[str, dict[str, Any]]:
    """One trial group, in its own process on whichever node Ray placed it: train the group's SAEs in one pass (SPG)
    and evaluate its trials one by one, recording each in ``sweep_trials``; a failing trial is recorded and the
    others go on."""
    import ray

    from spg_dist.stages.plans import Trial as T

    store = Store(store_uri, storage_options)
    node = ray.get_runtime_context().get_node_id()
    plan = SweepPlan.from_dict(plan_dict)
    group = [T(**t) for t in trials]
    attempts = {r["trial_id"]: int(r["attempt"]) for r in
                sweeps.trials(store, sweep_id, columns=["trial_id", "attempt"]).to_pylist()}
    start = utc_now()
    sweeps.upsert(store, [_row(sweep_id, t, status="running", attempt=attempts.get(t.trial_id, 0) + 1, node_id=node,
                               start=start) for t in group])
    out: dict[str, dict[str, Any]] = {}
    saes: dict[tuple, str] = {}
    shared_error = ""
    if group[0].detector == "spg":
        try:
            saes = _train_group_saes(store, plan, group)
        except Exception as e:  # every trial of the group needs these SAEs
            shared_error = f"SAE training: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    for t in group:
        t_start = utc_now()
        try:
            if shared_error:
                raise RuntimeError(shared_error)
            info = _evaluate_trial(store, plan, sweep_id, t, saes)
            out[t.trial_id] = {"status": "finished", "node_id": node}
            sweeps.upsert(store, [_row(sweep_id, t, status="finished", attempt=attempts.get(t.trial_id, 0) + 1,
                                       node_id=node, start=t_start, end=utc_now(), **info)])
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            out[t.trial_id] = {"status": "failed", "error": msg, "trace": traceback.format_exc(limit=3)}
            sweeps.upsert(store, [_row(sweep_id, t, status="failed", attempt=attempts.get(t.trial_id, 0) + 1,
                                       node_id=node, start=t_start, end=utc_now(), error=msg)])
    return out


def _lazy_remote():
    import ray

    return ray.remote(_group_fn)


class _RemoteProxy:
    """``run_group.options(...)`` without importing Ray at module import (the CLI's --help stays instant)."""

    _fn = None

    def options(self, **kw):
        if _RemoteProxy._fn is None:
            _RemoteProxy._fn = _lazy_remote()
        return _RemoteProxy._fn.options(**kw)


run_group = _RemoteProxy()


def _train_group_saes(store: Store, plan: SweepPlan, group: list[Trial]) -> dict[tuple, str]:
    """Every (C, k, sparsifier) of the group in one data pass, in this process; ``{(C, k, sparsifier): sae_id}``."""
    from spg_dist.ray.train_sae import train_saes

    c = group[0].config
    s1 = c["stage1"]
    trained = train_saes(store, token_backbone(c, plan.weights), c["layer"], Cs=sorted({t.config["C"] for t in group}),
                         ks=sorted({t.config["k"] for t in group}),
                         sparsifiers=sorted({t.config["sparsifier"] for t in group}), dataset=[c["aux"]], split=None,
                         epochs=s1["epochs"], batch_tokens=s1["batch_tokens"], batch_images=s1.get("batch_images"),
                         lr=s1["lr"], checkpoint_every=s1["checkpoint_every"], log_every=s1["log_every"],
                         seed=c["seed"], preprocess=None if c["preprocess"] == "none" else c["preprocess"],
                         use_gpu=plan.resources.gpus > 0, engine="local",
                         run_name=None if plan.share else f"{plan.name}-{group[0].trial_id}")
    return {(m["C"], m["k"], m["sparsifier"]): m["sae_id"] for m in trained.models}


def _evaluate_trial(store: Store, plan: SweepPlan, sweep_id: str, t: Trial, saes: dict[tuple, str]) -> dict[str, str]:
    from spg_dist.stages.detect import detect

    c = t.config
    run = trial_run(sweep_id, t)
    if t.detector == "spg":
        from spg_dist.stages.guides import train_guides

        sae_id = saes[(c["C"], c["k"], c["sparsifier"])]
        g = train_guides(store, sae_id, [c["aux"]], guide_config(c["guides"]), device="cpu")
        detect(store, "spg", c["target"], params={"guides": g.guide_id, "pooling": c["pooling"]}, run=run,
               resolution=plan.resolution)
        return {"run": run, "sae_id": sae_id, "guide_id": g.guide_id}
    params = dict(c.get("params") or {})
    aux = [c["aux"]] if t.detector in ("visualad",) else None
    detect(store, t.detector, c["target"], backbone=token_backbone(c, plan.weights), aux=aux, params=params, run=run,
           resolution=plan.resolution)
    return {"run": run}


__all__ = ["SweepResult", "check_resources", "prepare", "run_sweep", "token_backbone", "trial_run"]
