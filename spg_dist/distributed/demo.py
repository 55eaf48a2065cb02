"""``spg demo``: the pipeline end to end on data the project makes itself, re-using whatever the store holds.

Today: synthesise two datasets with disjoint categories (MVTec and VisA layouts), extract both, train an SAE on
the train-split tokens of both, encode everything, and write atom statistics plus a gallery of the most
category-general atom. Each stage is idempotent, so a re-run only does what is missing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from spg_dist.store import Store


@dataclass
class DemoResult:
    store: str
    lines: list[str] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)


def run_demo(out: str | Path = "demo_out", store: str | None = None, backbone: str = "tiny-dinov3",
             weights: str | None = None, C: int = 1024, k: int = 16, epochs: float = 5.0, seed: int = 0,
             num_cpus: int | None = None, echo: Callable[[str], None] = print) -> DemoResult:
    from spg_dist.data.synth import synthesize
    from spg_dist.distributed.encode import encode
    from spg_dist.distributed.extract import backbone_id_for, extract
    from spg_dist.distributed.runtime import ensure_ray
    from spg_dist.distributed.train_sae import train_saes
    from spg_dist.store.atoms import atom_stats, top_patches
    from spg_dist.store.sae_models import list_saes
    from spg_dist.viz import atom_gallery_png, atom_stats_png

    t0 = time.perf_counter()
    out_dir = Path(out)
    s = Store(store or out_dir / "store")
    res = DemoResult(s.uri)
    ensure_ray(num_cpus=num_cpus)
    datasets = []
    for layout in ("mvtec", "visa"):
        root = out_dir / "data" / f"synth_{layout}"
        if not (root / ".complete").exists():
            synthesize(root, layout=layout, seed=seed)
            (root / ".complete").write_text("ok\n")
        r = extract(f"{layout}:{root}", backbone, s, weights=weights)
        datasets.append(root.name)
        echo(f"[extract] {r.summary()}")
    bid = backbone_id_for(backbone, weights)
    rows = train_saes(s, bid, Cs=[C], ks=[k], epochs=epochs, batch_tokens=1024, log_every=25, checkpoint_every=100,
                      seed=seed)
    sae_id = rows[0]["sae_id"]
    echo(f"[train-sae] {sae_id}: nmse {rows[0]['nmse']:.3f}, L0 {rows[0]['l0']:.1f}, "
         f"dead {100 * rows[0]['dead_fraction']:.1f}% after {rows[0]['steps']} steps")
    e = encode(sae_id, s)
    echo(f"[encode] {e.summary()}")
    stats = atom_stats(s, sae_id)
    fired = stats[stats["count"] > 0]
    general = fired.sort_values(["category_entropy", "count"], ascending=False).iloc[0]
    specific = fired[fired["count"] >= 20].sort_values("category_entropy").iloc[0]
    reports = out_dir / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    res.artifacts["atom_stats"] = str(atom_stats_png(stats, reports / "atom_stats.png"))
    for name, atom in (("general", int(general["atom"])), ("specific", int(specific["atom"]))):
        top = top_patches(s, sae_id, atom, 8)
        res.artifacts[f"gallery_{name}"] = str(atom_gallery_png(s, sae_id, atom, top, reports / f"atom_{atom}.png"))
        echo(f"[atoms] most category-{name} atom {atom}: entropy {stats.loc[stats['atom'] == atom, 'category_entropy'].item():.2f}, "
             f"top categories {sorted(set(top.column('category').to_pylist()))}")
    echo(f"[store] {s.uri}: " + ", ".join(f"{t}={s.count(t)}" for t in
                                          ("images", "patch_tokens", "errors", "sae_models", "sae_codes", "atom_index",
                                           "atom_top")))
    echo(f"[store] {len(list_saes(s))} SAE(s) registered; artifacts: " +
         ", ".join(f"{k}={v}" for k, v in res.artifacts.items()))
    echo(f"[demo] done in {time.perf_counter() - t0:.0f} s")
    return res
