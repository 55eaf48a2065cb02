"""``spg sweep report``: a sweep's finished trials joined with their ``eval_results`` (and their guides' sparsity)
into one table, and the paper's figures drawn from it (``spg_dist.viz.sweep_report``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spg_dist.errors import UnknownNameError
from spg_dist.evaluation import METRICS, parse_pooling
from spg_dist.stages.plans import guide_config, guide_label
from spg_dist.store import Store, eval_results, guides, sweeps


def trial_frame(store: Store | str, sweep_id: str) -> pd.DataFrame:
    """One row per finished trial with its settings, the four mean metrics and the guides' total active atoms."""
    store = store if isinstance(store, Store) else Store(store)
    t = sweeps.trials(store, sweep_id, status="finished")
    if t.num_rows == 0:
        known = sweeps.sweep_ids(store)
        raise UnknownNameError(f"no finished trials of sweep {sweep_id!r} in {store.uri}; sweeps: "
                               f"{', '.join(known) or 'none (run `spg sweep --config ...`)'}")
    rows = t.to_pylist()
    res = eval_results.read(store, run=[r["run"] for r in rows], category="mean",
                            columns=["run", "metric", "value"]).to_pandas()
    metrics = res.pivot_table(index="run", columns="metric", values="value") if len(res) else pd.DataFrame()
    active = {}
    for gid in sorted({r["guide_id"] for r in rows if r["guide_id"]}):
        g = guides.find(store, gid)
        if g is not None:
            active[gid] = int(g["active_normal"]) + int(g["active_anomaly"])
    out = []
    for r in rows:
        c = json.loads(r["config"])
        spg = r["detector"] == "spg"
        gcfg = guide_config(c["guides"]) if spg else None
        pooling = c.get("pooling", "")
        p = parse_pooling(pooling) if pooling else None
        out.append({
            "trial_id": r["trial_id"], "detector": r["detector"], "backbone": c["backbone"],
            "token": c.get("token", "block"), "layer": c["layer"], "C": c.get("C", np.nan), "k": c.get("k", np.nan),
            "sparsifier": c.get("sparsifier", ""), "guide": guide_label(c["guides"]) if spg else "",
            "nonneg": gcfg.nonneg if gcfg else "", "k_g": gcfg.k_g if gcfg and gcfg.k_g else np.nan,
            "beta_l1": gcfg.beta_l1 if gcfg else np.nan, "pooling": pooling,
            "tau": p.value if p and p.kind == "lse" else (0.0 if p and p.kind == "max" else np.nan),
            "direction": f"{c['aux']} -> {c['target']}", "seed": c["seed"],
            "active_total": active.get(r["guide_id"], np.nan), "node_id": r["node_id"],
            **{m: float(metrics.loc[r["run"], m]) if r["run"] in metrics.index and m in metrics.columns else np.nan
               for m in METRICS}})
    return pd.DataFrame(out)


def report(store: Store | str, sweep_id: str, out: str | Path) -> dict[str, Any]:
    """``summary.csv``/``summary.md``, ``trials.csv`` and every figure the sweep's data supports."""
    from spg_dist.viz.sweep_report import summary_table, write_report

    df = trial_frame(store, sweep_id)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "trials.csv", index=False)
    paths = dict(write_report(df, out, title=f"sweep {sweep_id}"))
    paths["trials_csv"] = str(out / "trials.csv")
    table = summary_table(df)
    paths["table"] = table.to_string()
    return paths


__all__ = ["report", "trial_frame"]
