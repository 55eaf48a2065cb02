"""Token-preprocessing / guide-settings study on the demo's store (issue 5): which options make SPG transfer.

For each variant and seed, in both zero-shot directions of ``spg demo`` (VisA-layout -> MVTec-layout and back):
fit the preprocessing on the auxiliary tokens, train a TopK SAE (C = 1024, k = 16, 5 epochs, batch 1024: the
demo's settings) in-process with ``MultiSAETrainer``, learn guides with ``GuideTrainer``, and evaluate on the
target's test split. Prints pixel / image AUROC per direction (mean over seeds) next to the baseline variant
(raw tokens, the same guide settings), so each row is a difference measured on the same data in one process.

Also: "free guides" (the dictionary replaced by ±unit vectors, so the guides range over all of token space: the
ceiling of the two-guide cosine rule on these tokens, with no SAE in the way).

    spg demo                                   # builds demo_out/store first
    python bench/guides_study.py --store demo_out/store --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from spg_dist.ray.sae_data import memory_batches
from spg_dist.stages.inputs import MASK_SCALE, load_masks
from spg_dist.store import images
from spg_dist.evaluation import evaluate_category, mean_over_categories
from spg_dist.guides import GuideConfig
from spg_dist.guides.scoring import image_scores, upsample
from spg_dist.guides.trainer import GuideTrainer
from spg_dist.sae import MultiSAETrainer, Preprocessing, SAEConfig, TopKSAE, TrainConfig
from spg_dist.store import Store
from spg_dist.store.tokens import load_tokens

DIRECTIONS = (("synth_visa", "synth_mvtec"), ("synth_mvtec", "synth_visa"))
CLASSICAL = GuideConfig.preset("classical")
VARIANTS = [  # (label, preprocessing steps, guide config, free guides)
    ("raw tokens (baseline)", "", CLASSICAL, False),
    ("constant", "constant", CLASSICAL, False),
    ("standardize,constant  [classical preset]", "standardize,constant", CLASSICAL, False),
    ("center,standardize,constant", "center,standardize,constant", CLASSICAL, False),
    ("center,constant", "center,constant", CLASSICAL, False),
    ("standardize (no constant)", "standardize", CLASSICAL, False),
    ("standardize,constant, T = 0.1", "standardize,constant", replace(CLASSICAL, temperature=0.1), False),
    ("standardize,constant, paper loss/T/lr", "standardize,constant",
     replace(GuideConfig.preset("paper"), subtract_b_pre=False, steps=150), False),
    ("free guides, raw tokens", "", CLASSICAL, True),
    ("free guides, standardize,constant", "standardize,constant", CLASSICAL, True),
]


class Data:
    def __init__(self, store: Store, backbone: str, layer: int):
        self.store, self.backbone, self.layer, self.cache = store, backbone, layer, {}

    def get(self, dataset: str, split: str | None = None):
        if (dataset, split) not in self.cache:
            meta, toks = load_tokens(self.store, self.backbone, self.layer, dataset=dataset,
                                     **({"split": split} if split else {}))
            size = MASK_SCALE * max(toks.shape[1:3])
            masks = load_masks(meta.column("image_id").to_pylist(), images.uris(self.store, dataset), size)
            self.cache[dataset, split] = (meta, torch.from_numpy(toks.astype(np.float32)), torch.from_numpy(masks))
        return self.cache[dataset, split]


def fit_sae(toks: torch.Tensor, steps: str, free: bool, seed: int, C: int, k: int, epochs: int) -> TopKSAE:
    n, h, w, d = toks.shape
    images = toks.reshape(n, h * w, d)
    pre = Preprocessing.fit(images, steps=steps) if steps else Preprocessing()
    dim = pre.out_dim(d)
    if free:
        sae = TopKSAE(SAEConfig(d=dim, C=2 * dim, k=1), pre)
        with torch.no_grad():
            sae.W_dec.copy_(torch.cat([torch.eye(dim), -torch.eye(dim)]))
        return sae.eval()
    trainer = MultiSAETrainer([SAEConfig(d=dim, C=C, k=k, dead_tokens=5000)],
                              TrainConfig(lr=1e-3, batch_tokens=1024, seed=seed), pre)
    xp = pre.apply(images).reshape(-1, dim)  # what the Ray workers' loaders do, per image, before shuffling
    g = torch.Generator().manual_seed(seed)
    trainer.init_from_sample(xp[torch.randperm(len(xp), generator=g)[:65536]], preprocessed=True)
    for epoch in range(epochs):
        for batch in memory_batches(xp, 1024, epoch, seed):
            trainer.step(batch, preprocessed=True)
    return trainer.saes[0].eval()


def run_direction(data: Data, aux: str, target: str, steps: str, cfg: GuideConfig, free: bool, seed: int,
                  C: int, k: int, epochs: int) -> dict[str, float]:
    _, toks, masks = data.get(aux)
    sae = fit_sae(toks, steps, free, seed, C, k, epochs)
    trainer = GuideTrainer(sae, replace(cfg, seed=seed))
    trainer.fit(toks, masks)
    meta, test, test_masks = data.get(target, "test")
    with torch.no_grad():
        maps = upsample(trainer.guides.patch_probs(test, ema=True), test_masks.shape[-1])
        scores = image_scores(maps, "max").numpy()
    cats = np.asarray(meta.column("category").to_pylist())
    labels = np.asarray(meta.column("label").to_pylist())
    per = {c: evaluate_category(labels[cats == c], scores[cats == c], test_masks.numpy()[cats == c],
                                maps.numpy()[cats == c]) for c in sorted(set(cats))}
    return mean_over_categories(per)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="demo_out/store", help="A store holding the demo's two datasets.")
    ap.add_argument("--backbone", default="texture-filterbank")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds (SAE init, guide init, batches).")
    ap.add_argument("-C", type=int, default=1024)
    ap.add_argument("-k", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = Data(Store(args.store), args.backbone, args.layer)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{'variant':44s} " + "  ".join(f"{a[6:]}->{t[6:]} px / img" for a, t in DIRECTIONS) + "   mean px / img")
    base = None
    for label, steps, cfg, free in VARIANTS:
        t0 = time.perf_counter()
        cols = []
        for aux, target in DIRECTIONS:
            runs = [run_direction(data, aux, target, steps, cfg, free, s, args.C, args.k, args.epochs) for s in seeds]
            cols.append((np.mean([r["pixel_auroc"] for r in runs]), np.mean([r["image_auroc"] for r in runs])))
        mean = (np.mean([c[0] for c in cols]), np.mean([c[1] for c in cols]))
        base = base or mean
        print(f"{label:44s} " + "  ".join(f"{px:.3f} / {im:.3f}        " for px, im in cols)
              + f"  {mean[0]:.3f} / {mean[1]:.3f}  (Δ px {mean[0] - base[0]:+.3f})  {time.perf_counter() - t0:.0f} s",
              flush=True)


if __name__ == "__main__":
    main()
