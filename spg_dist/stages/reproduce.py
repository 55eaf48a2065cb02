"""``spg reproduce``: the paper's Table 1 (and the per-category Tables S1-S8) with one command, mean ± std over
seeds, beside the paper's numbers.

A reproduction config (``configs/paper.yaml``) names the datasets and their layouts (paths come from ``--data
NAME=PATH``), the backbones (local weights from ``--weights NAME=PATH``) with their token choice and layer, the two
transfer directions, Stage 1 and Stage 2 settings, the evaluation protocol and the paper's numbers. It resolves to
one sweep per backbone (``spg_dist.ray.sweep``: extraction, Stage 1, Stage 2, evaluation, resumable) and the results
are read back from ``eval_results``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from spg_dist.evaluation import METRICS
from spg_dist.stages.plans import (Direction, PlanError, Resources, Stage1, SweepPlan, _strict, read_yaml)
from spg_dist.store import Store, eval_results, sweeps

METRIC_LABELS = {"image_auroc": "img AUROC", "image_ap": "img AP", "pixel_auroc": "px AUROC", "aupro": "AUPRO"}


@dataclass(frozen=True)
class DatasetEntry:
    layout: str
    path: str = ""
    synth: dict | None = None  # {seed, n_train, ...}: synthesise the dataset at path when it is missing

    @classmethod
    def from_value(cls, name: str, value: Any) -> "DatasetEntry":
        if isinstance(value, str):
            return cls(layout=value)
        d = _strict(cls, value, f"datasets.{name}")
        return cls(**d)


@dataclass(frozen=True)
class BackboneEntry:
    token: str = "block"
    layer: int = -1
    weights: str = ""

    @classmethod
    def from_value(cls, name: str, value: Any) -> "BackboneEntry":
        return cls(**_strict(cls, value or {}, f"backbones.{name}"))


@dataclass(frozen=True)
class ReproducePlan:
    name: str
    datasets: dict[str, DatasetEntry]
    backbones: dict[str, BackboneEntry]
    directions: tuple[str, ...]
    seeds: int = 1
    C: int = 4096
    k: int = 32
    sparsifier: str = "topk"
    preprocess: str = "none"
    stage1: Stage1 = Stage1()
    guides: dict = field(default_factory=lambda: {"preset": "paper"})
    pooling: str = "max"
    resolution: int | str | None = "native"
    resources: Resources = Resources()
    store: str = "reproduce_out/store"
    paper: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # backbone -> direction -> 4 metrics (%)
    paper_source: str = ""

    def sweeps(self, require_paths: bool = True) -> list[SweepPlan]:
        data = {}
        for name, d in self.datasets.items():
            if not d.path and require_paths:
                raise PlanError(f"dataset {name!r} has no path: pass --data {name}=PATH")
            data[name] = f"{d.layout}:{d.path or f'<--data {name}=PATH>'}@{name}"
        out = []
        for backbone, b in self.backbones.items():
            grid = {"backbone": [backbone], "token": [b.token], "layer": [b.layer], "C": [self.C], "k": [self.k],
                    "sparsifier": [self.sparsifier], "preprocess": [self.preprocess], "guides": [self.guides],
                    "pooling": [self.pooling], "direction": list(self.directions), "seed": list(range(self.seeds)),
                    "detectors": ["spg"]}
            tag = hashlib.sha1(json.dumps([self.name, backbone, dataclasses.asdict(b)], sort_keys=True)
                               .encode()).hexdigest()[:6]
            out.append(SweepPlan.from_dict({
                "name": f"{self.name}-{backbone.replace('@', '_')}-{tag}", "grid": grid, "data": data,
                "stage1": dataclasses.asdict(self.stage1), "resources": dataclasses.asdict(self.resources),
                "resolution": self.resolution, "store": self.store,
                "weights": {backbone: b.weights} if b.weights else {}}))
        return out

    def describe(self) -> dict[str, Any]:
        from spg_dist.stages.cost import estimate

        plans = self.sweeps(require_paths=False)
        return {"reproduce": json.loads(json.dumps(dataclasses.asdict(self), default=str)),
                "sweeps": [p.describe() for p in plans],
                "estimated_cost": estimate(self)}


def load_reproduction(path: str, data: Sequence[str] = (), weights: Sequence[str] = (), seeds: int | None = None,
                      store: str | None = None) -> ReproducePlan:
    """A reproduction config with ``--data NAME=PATH`` / ``--weights NAME=PATH`` / ``--seeds`` applied."""
    raw = read_yaml(path)
    d = _strict(ReproducePlan, {k: v for k, v in raw.items() if k != "kind"}, "reproduce config")
    datasets = {str(n): DatasetEntry.from_value(n, v) for n, v in (d.get("datasets") or {}).items()}
    backbones = {str(n): BackboneEntry.from_value(n, v) for n, v in (d.get("backbones") or {}).items()}
    for item in data:
        name, sep, value = item.partition("=")
        if not sep or name not in datasets:
            raise PlanError(f"--data {item!r}: write NAME=PATH with NAME one of {', '.join(datasets) or 'none'}")
        if not Path(value).expanduser().is_dir():
            raise PlanError(f"--data {item!r}: {value} is not a folder")
        datasets[name] = dataclasses.replace(datasets[name], path=str(Path(value).expanduser().absolute()))
    for item in weights:
        name, sep, value = item.partition("=")
        if not sep or name not in backbones:
            raise PlanError(f"--weights {item!r}: write BACKBONE=PATH with BACKBONE one of {', '.join(backbones)}")
        if not Path(value).expanduser().exists():
            raise PlanError(f"--weights {item!r}: {value} does not exist")
        backbones[name] = dataclasses.replace(backbones[name], weights=str(Path(value).expanduser().absolute()))
    for name, entry in datasets.items():
        if entry.path and not Path(entry.path).exists() and entry.synth is None:
            raise PlanError(f"dataset {name!r}: {entry.path} does not exist; pass --data {name}=PATH")
    if not backbones:
        raise PlanError("reproduce config: no backbones")
    directions = tuple(d.get("directions") or ())
    if not directions:
        raise PlanError("reproduce config: no directions (write e.g. [visa->mvtec, mvtec->visa])")
    for text in directions:
        dr = Direction.parse(text)
        for ds in (dr.aux, dr.target):
            if ds not in datasets:
                raise PlanError(f"direction {text!r}: dataset {ds!r} is not under datasets:")
    n_seeds = int(seeds if seeds is not None else d.get("seeds", 1))
    if n_seeds < 1:
        raise PlanError(f"--seeds {n_seeds}: at least 1")
    plan = ReproducePlan(
        name=str(d.get("name") or Path(path).stem), datasets=datasets, backbones=backbones, directions=directions,
        seeds=n_seeds, C=int(d.get("C", 4096)), k=int(d.get("k", 32)), sparsifier=d.get("sparsifier", "topk"),
        preprocess=str(d.get("preprocess", "none")), stage1=Stage1.from_dict(d.get("stage1") or {}),
        guides=dict(d.get("guides") or {"preset": "paper"}), pooling=str(d.get("pooling", "max")),
        resolution=d.get("resolution", "native"), resources=Resources.from_dict(d.get("resources") or {}),
        store=str(store or d.get("store") or "reproduce_out/store"), paper=dict(d.get("paper") or {}),
        paper_source=str(d.get("paper_source") or ""))
    for sp in plan.sweeps(require_paths=False):  # the grid, guides and detectors validate here, before any work
        sp.trials()
    return plan


@dataclass
class ReproduceResult:
    table1: pd.DataFrame
    per_category: dict[str, pd.DataFrame]
    table1_text: str
    files: list[str]
    failed: int


def _fmt(values: list[float]) -> str:
    vals = [100 * v for v in values if v == v]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{np.mean(vals):.1f} ± {np.std(vals, ddof=1):.1f}"


def collect(store: Store, plan: ReproducePlan) -> pd.DataFrame:
    """Every (backbone, direction, seed, category, metric) value of the plan's finished trials."""
    rows = []
    for backbone, sp in zip(plan.backbones, plan.sweeps()):
        t = sweeps.trials(store, sp.name, status="finished", columns=["trial_id", "config", "run"]).to_pylist()
        if not t:
            continue
        res = eval_results.read(store, run=[r["run"] for r in t],
                                columns=["run", "category", "metric", "value"]).to_pandas()
        info = {r["run"]: json.loads(r["config"]) for r in t}
        for _, r in res.iterrows():
            c = info[r["run"]]
            rows.append({"backbone": backbone, "direction": f"{c['aux']}->{c['target']}", "seed": c["seed"],
                         "category": r["category"], "metric": r["metric"], "value": r["value"]})
    return pd.DataFrame(rows, columns=["backbone", "direction", "seed", "category", "metric", "value"])


def tables(values: pd.DataFrame, plan: ReproducePlan) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Table 1 (mean over categories: ours mean ± std over seeds, paper, difference) and the per-category tables
    (one per direction and metric: categories x backbones)."""
    t1 = []
    for backbone in plan.backbones:
        for direction in plan.directions:
            dr = Direction.parse(direction)
            key = f"{dr.aux}->{dr.target}"
            sel = values[(values.backbone == backbone) & (values.direction == key) & (values.category == "mean")]
            paper = (plan.paper.get(backbone) or {}).get(direction) or (plan.paper.get(backbone) or {}).get(key)
            row = {("", "backbone"): backbone, ("", "direction"): key, ("", "seeds"): int(sel.seed.nunique())}
            for i, m in enumerate(METRICS):
                vals = sel[sel.metric == m].sort_values("seed").value.tolist()
                mean = 100 * float(np.nanmean(vals)) if vals else float("nan")
                row[(METRIC_LABELS[m], "ours")] = _fmt(vals)
                row[(METRIC_LABELS[m], "paper")] = f"{paper[i]:.1f}" if paper else "—"
                row[(METRIC_LABELS[m], "Δ")] = f"{mean - paper[i]:+.1f}" if paper and mean == mean else "—"
            t1.append(row)
    table1 = pd.DataFrame(t1) if t1 else pd.DataFrame()
    if t1:
        table1.columns = pd.MultiIndex.from_tuples(table1.columns)
        table1 = table1.set_index([("", "backbone"), ("", "direction")])
        table1.index.names = ["backbone", "direction"]
    per: dict[str, pd.DataFrame] = {}
    n = 0
    for direction in plan.directions:
        dr = Direction.parse(direction)
        key = f"{dr.aux}->{dr.target}"
        for m in METRICS:
            n += 1
            sel = values[(values.direction == key) & (values.metric == m)]
            cats = sorted(c for c in sel.category.unique() if c != "mean") + ["mean"]
            df = pd.DataFrame({b: [_fmt(sel[(sel.backbone == b) & (sel.category == c)].sort_values("seed").value
                                        .tolist()) for c in cats] for b in plan.backbones}, index=cats)
            df.index.name = "category"
            per[f"S{n} {key} {METRIC_LABELS[m]}"] = df
    return table1, per


def reproduce(plan: ReproducePlan, out: str | None = None, *, address: str | None = None,
              num_cpus: int | None = None, echo: Callable[[str], None] = print,
              progress: bool = True) -> ReproduceResult:
    """Run (or resume) every sweep of the plan, then write and return the tables."""
    from spg_dist.ray.sweep import run_sweep

    for name, d in plan.datasets.items():
        if d.synth is not None and d.path and not (Path(d.path) / ".complete").exists():
            from spg_dist.data.synth import synthesize

            synthesize(d.path, layout=d.layout, **d.synth)
            (Path(d.path) / ".complete").write_text("ok\n")
            echo(f"[synth] {name}: {d.path}")
    store = Store(plan.store)
    failed = 0
    for sp in plan.sweeps():
        r = run_sweep(store, sp, address=address, num_cpus=num_cpus, echo=echo, progress=progress)
        failed += r.failed
        echo(f"[sweep] {r.summary()}")
        for tid, err in sorted(r.errors.items()):
            echo(f"[sweep] failed {tid}: {err}")
    values = collect(store, plan)
    table1, per = tables(values, plan)
    out_dir = Path(out or f"reproduce_out/{plan.name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    from spg_dist.stages.evaluate import markdown_table

    table1.to_csv(out_dir / "table1.csv")
    text = table1.to_string()
    md = [f"# {plan.name}: Table 1 (mean over categories, %, mean ± std over {plan.seeds} seed(s))\n",
          (f"Paper numbers: {plan.paper_source}\n" if plan.paper_source else ""), _md(table1)]
    for title, df in per.items():
        slug = title.split()[0].lower()
        df.to_csv(out_dir / f"table_{slug}.csv")
        md += [f"\n## Table {title}\n", _md(df)]
    (out_dir / "tables.md").write_text("\n".join(md))
    files += [str(out_dir / "table1.csv"), str(out_dir / "tables.md")] + \
        [str(out_dir / f"table_{t.split()[0].lower()}.csv") for t in per]
    _ = markdown_table
    header = (f"Table 1 — {plan.name}: mean over target categories (%), mean ± std over {plan.seeds} seed(s); "
              f"paper and difference (ours - paper) beside")
    return ReproduceResult(table1, per, header + "\n" + text, files, failed)


def _md(df: pd.DataFrame) -> str:
    cols = [" ".join(x for x in c if x) if isinstance(c, tuple) else str(c) for c in df.columns]
    idx = list(df.index.names) if df.index.nlevels > 1 else [df.index.name or ""]
    lines = ["| " + " | ".join(idx + cols) + " |", "|" + "|".join(["---"] * (len(idx) + len(cols))) + "|"]
    for key, row in df.iterrows():
        keys = list(key) if isinstance(key, tuple) else [key]
        lines.append("| " + " | ".join([str(k) for k in keys] + [str(v) for v in row.tolist()]) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["BackboneEntry", "DatasetEntry", "ReproducePlan", "ReproduceResult", "collect", "load_reproduction",
           "reproduce", "tables"]
