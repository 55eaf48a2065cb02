"""Training-free baselines on the same stored tokens as SPG, scored with the same metrics and written to the same
``eval_results`` table: few-shot kNN (AnomalyDINO-style, k normal train images of each target category) and the
label-free MuSc-style score (each test patch against the other test images of its category)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from spg_dist.detectors import KNNDetector, MuScDetector, image_score
from spg_dist.distributed.eval_io import (MASK_SCALE, load_masks, mask_uris, results_frame, token_grid,
                                          write_eval_results)
from spg_dist.distributed.stage2 import NoTargetDataError
from spg_dist.evaluation import evaluate_category, mean_over_categories
from spg_dist.guides import upsample
from spg_dist.store import Store, load_tokens


def evaluate_baseline(store: Store | str, backbone: str, layer: int, target_dataset: str, detector: str = "knn",
                      k_shot: int = 4, mask_size: int | None = None, run: str | None = None) -> pd.DataFrame:
    """Per-category and mean image AUROC/AP, pixel AUROC and AUPRO of a training-free detector on the test split."""
    store = store if isinstance(store, Store) else Store(store)
    grid = token_grid(store, backbone, layer, dataset=target_dataset, split="test")
    if grid is None:
        raise NoTargetDataError(f"no test-split tokens of {backbone} layer {layer} for {target_dataset!r}")
    mask_size = int(mask_size or MASK_SCALE * max(grid))
    uris = mask_uris(store, [target_dataset])
    meta, toks = load_tokens(store, backbone, layer, dataset=target_dataset, split="test")
    cats = np.asarray(meta.column("category").to_pylist())
    ids = np.asarray(meta.column("image_id").to_pylist())
    labels = np.asarray(meta.column("label").to_pylist())
    results: dict[str, dict[str, Any]] = {}
    for cat in sorted(set(cats)):
        sel = cats == cat
        x = toks[sel].astype(np.float32)
        if detector == "knn":
            _, normal = load_tokens(store, backbone, layer, dataset=target_dataset, category=cat, split="train")
            patch = KNNDetector(k_shot_images=k_shot).fit(normal[:k_shot].astype(np.float32)).score(x)
        elif detector == "musc":
            patch = MuScDetector().score(x)
        else:
            raise ValueError(f"unknown baseline {detector!r}; use knn or musc")
        maps = upsample(torch.from_numpy(patch), mask_size).numpy()
        results[cat] = evaluate_category(labels[sel], image_score(patch), load_masks(list(ids[sel]), uris, mask_size),
                                         maps)
    results["mean"] = mean_over_categories(results)
    name = f"{detector}-{k_shot}shot" if detector == "knn" else detector
    run = run or f"{backbone}/L{layer}/{name}"
    write_eval_results(store, results, run=run, detector=name, target_dataset=target_dataset, pooling="top1%")
    return results_frame(results)
