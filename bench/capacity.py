"""Capacity planner for the SPG paper grid: tokens, store bytes, SAE FLOPs, GPU-hours, and what `spg sweep`'s
shared work saves against running every trial alone. Pure arithmetic (nothing is run, no GPU needed); every
time figure names its source, "measured on one H200" or "from FLOPs at X % of peak", and every table prints
a ratio against a baseline computed in the same run.

    python bench/capacity.py                                      # DINOv3 ViT-L/16 @448, both directions, 1 and 8 GPUs
    python bench/capacity.py --backbone all --seeds 3 --gpus 1,8,32
    python bench/capacity.py --guide-settings 9 --aux-split train --encode aux
    python bench/capacity.py --extract-efficiency 0.24            # the naive Ray pipeline with its write (H200 reference figures, bench/gpu_check.py)
    python bench/capacity.py --json                               # everything as one JSON document

Model (the assumptions are also printed under each table):
  tokens      images x grid^2 (CLS/register tokens dropped), one layer (the last) per backbone.
  store       patch_tokens fp16 + 1.7 % Lance overhead (README: 153 kB stored for 150.5 kB of tokens);
              sae_codes and atoms (atom_images + atom_top) at the bytes per activation (token x k) measured by
              bench/atoms.py (CODES_/ATOMS_BYTES_PER_ACTIVATION); atoms only for the SAEs a user encodes
              (`spg encode`), a sweep encodes none; SAE weights fp32 in sae_models.
  SAE FLOPs   our sparse kernels (spg_dist/sae/kernels.py), see `sae_flops`.
  SAE time    a + b*C seconds per token per SAE, fitted to the dense TopK step measured on the H200 (k-independent,
              no AuxK); AuxK on top from the measured top-k time and its FLOPs.
  extraction  measured bare bf16 forward rate on the H200 where the reference has one, ViT FLOPs at the fraction of peak
              otherwise.
  sweep       alone: every trial (backbone, direction, C, k, seed, guide setting) extracts both datasets, loads its
              tokens, trains its SAE and its guides. shared: extraction once per (backbone, layer, dataset), one
              data pass per (backbone, layer, aux dataset, seed, C) that trains every k of that width, each SAE once
              for all guide settings. Evaluation is left out of both (CPU-bound metrics, one per trial either way).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from spg_dist.stages.cost import (  # noqa: F401  (the model lives in the package; this file prints it)
    ATOMS_BYTES_PER_ACTIVATION, BACKBONES, CODES_BYTES_PER_ACTIVATION, CostModel, DATASETS, DEFAULT_BACKBONE, DIRECTIONS, Grid, H200_DENSE_STEP, H200_DENSE_STEP_BATCH, H200_FORWARD_IMAGES_PER_S, H200_PEAK_FLOPS, H200_PIPELINE_IMAGES_PER_S, H200_TOPK_S_PER_TOKEN_LATENT, LANCE_OVERHEAD, PAPER_BATCH_IMAGES, PAPER_CS, PAPER_EPOCHS, PAPER_KS, SRC_CPU, SRC_MEASURED, STEP_MODEL, STORE_READ_BYTES_PER_S, backbone_shape, dataset_images, default_mfu, dense_sae_flops, extract_rate, extract_seconds, fit_step_model, guide_seconds, k_aux_effective, load_seconds, lpt_makespan, measured_mfu, plan, sae_flops, sae_seconds, src_flops, step_seconds, store_bytes, tokens_per_dataset, tokens_per_image, vit_forward_flops)


def report(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the tables print, as one JSON-able dict."""
    costs = CostModel(mfu=args.mfu, extract_efficiency=args.extract_efficiency, auxk=not args.no_auxk,
                      dead_fraction=args.dead_fraction, read_bytes_per_s=args.read_gbps * 1e9)
    frac = costs.fraction()
    grid = Grid(backbones=tuple(args.backbones), Cs=tuple(args.Cs), ks=tuple(args.ks), seeds=args.seeds,
                epochs=args.epochs, aux_split=args.aux_split, encode=args.encode)
    out: dict[str, Any] = {"assumptions": {
        "peak_flops": costs.peak_flops, "fraction_of_peak": frac,
        "fraction_source": ("--mfu" if args.mfu is not None else
                            "median of the fractions implied by the measured bare forwards (H200 reference figures, bench/gpu_check.py)"),
        "measured_fractions": {b: measured_mfu(b) for b in H200_FORWARD_IMAGES_PER_S},
        "step_model_a_s_per_token": costs.step_model[0], "step_model_b_s_per_token_latent": costs.step_model[1],
        "atoms_bytes_per_activation": ATOMS_BYTES_PER_ACTIVATION,
        "codes_bytes_per_activation": CODES_BYTES_PER_ACTIVATION, "lance_overhead": LANCE_OVERHEAD,
        "read_bytes_per_s": costs.read_bytes_per_s, "extract_efficiency": costs.extract_efficiency,
        "dead_fraction": costs.dead_fraction, "auxk": costs.auxk, "guide_steps": costs.guide_steps,
        "guide_step_floor_s": costs.guide_step_floor_s, "datasets": DATASETS}}

    # tokens (every backbone, ratio against DINOv3)
    base = tokens_per_dataset(DEFAULT_BACKBONE)["total"]
    out["tokens"] = {bb: {**backbone_shape(bb), **tokens_per_dataset(bb),
                          "aux_tokens": {n: tokens_per_dataset(bb, args.aux_split)[n] for n in DATASETS},
                          "vs_dinov3": tokens_per_dataset(bb)["total"] / base} for bb in BACKBONES}

    # store
    store: dict[str, Any] = {}
    for bb in grid.backbones:
        s = backbone_shape(bb)
        tk = tokens_per_dataset(bb)
        pt = {n: store_bytes(tk[n], s["dim"], 1)["patch_tokens"] for n in DATASETS}
        pt["total"] = sum(pt.values())
        per_dir = {}
        for aux, target in grid.directions:
            enc_tokens = tk["total"] if grid.encode == "both" else tk[aux]
            cells = {f"{C},{k}": store_bytes(enc_tokens, s["dim"], k, C) for C in grid.Cs for k in grid.ks}
            tot = {key: grid.seeds * sum(c[key] for c in cells.values())
                   for key in ("sae_codes", "atoms", "activations", "sae_weights")}
            per_dir[f"{aux}->{target}"] = {"encoded_tokens": enc_tokens, "cells": cells, "grid_total": tot}
        grid_tot = {key: sum(v["grid_total"][key] for v in per_dir.values())
                    for key in ("sae_codes", "atoms", "activations", "sae_weights")}
        grid_tot["patch_tokens"] = pt["total"]
        grid_tot["total"] = grid_tot["patch_tokens"] + grid_tot["sae_codes"] + grid_tot["atoms"] + grid_tot["sae_weights"]
        store[bb] = {"patch_tokens": pt, "directions": per_dir, "grid_total": grid_tot}
    out["store"] = store

    # FLOPs and SAE time per (C, k), per backbone and direction (aux tokens x epochs)
    sae: dict[str, Any] = {}
    for bb in grid.backbones:
        d = backbone_shape(bb)["dim"]
        sae[bb] = {}
        for aux, target in grid.directions:
            N = tokens_per_dataset(bb, grid.aux_split)[aux]
            cells = {}
            for C in grid.Cs:
                for k in grid.ks:
                    k_aux = k_aux_effective(d, C, costs.dead_fraction) if costs.auxk else 0
                    fl = sae_flops(N, d, C, k, k_aux=k_aux, batch_tokens=PAPER_BATCH_IMAGES * tokens_per_image(bb))
                    t = sae_seconds(N * grid.epochs, d, C, k, costs, PAPER_BATCH_IMAGES * tokens_per_image(bb))
                    cells[f"{C},{k}"] = {"flops_per_epoch": fl, "dense_flops_per_epoch": dense_sae_flops(N, d, C),
                                         "flops_all_epochs": fl["total"] * grid.epochs,
                                         "seconds": t, "source": f"{SRC_MEASURED} (+ AuxK: measured top-k, FLOPs)"}
            sae[bb][f"{aux}->{target}"] = {"tokens_per_epoch": N, "epochs": grid.epochs, "cells": cells}
    out["sae"] = sae

    # extraction
    out["extraction"] = {}
    for bb in BACKBONES:
        rate, src = extract_rate(bb, costs)
        flops_rate = frac * costs.peak_flops / vit_forward_flops(bb) * costs.extract_efficiency
        imgs = sum(dataset_images(n) for n in DATASETS)
        out["extraction"][bb] = {"images_per_s": rate, "source": src, "flops_images_per_s": flops_rate,
                                 "gflops_per_image": vit_forward_flops(bb) / 1e9, "both_datasets_s": imgs / rate}

    # the sweep, alone vs shared, default guide settings and --guide-settings N
    out["sweep"] = {str(gs): plan(replace(grid, guide_settings=gs), args.gpus, costs)
                    for gs in sorted({1, args.guide_settings})}
    return out


def _gb(x: float) -> str:
    return f"{x / 1e9:,.1f}"


def print_tables(r: dict[str, Any], args: argparse.Namespace) -> None:
    a = r["assumptions"]
    frac = a["fraction_of_peak"]
    print(f"capacity plan: backbone(s) {', '.join(args.backbones)}; C in {args.Cs} x k in {args.ks}; "
          f"{args.seeds} seed(s); {args.epochs} epochs; SAE/guides fit on the aux dataset's '{args.aux_split}' images; "
          f"encode: {args.encode}")
    fr = ", ".join(f"{b} {100 * v:.1f} %" for b, v in a["measured_fractions"].items())
    print(f"fraction of the {a['peak_flops'] / 1e12:.0f} TFLOP/s bf16 peak for FLOPs-based figures: {100 * frac:.1f} % "
          f"({a['fraction_source']}: {fr})")

    # 1. tokens
    print("\n[tokens] patch tokens per dataset (all images; CLS/register tokens dropped)")
    print(f"  {'backbone':21s} {'px':>4} {'grid':>5} {'tok/img':>7} {'d':>5} {'MVTec AD':>12} {'VisA':>12} "
          f"{'total':>12} {'vs dinov3':>9}")
    for bb, t in r["tokens"].items():
        mark = "*" if bb in args.backbones else " "
        print(f" {mark}{bb:21s} {t['image_size']:>4} {t['grid']:>2}x{t['grid']:<2} {t['tokens_per_image']:>7} "
              f"{t['dim']:>5} {t['mvtec']:>12,} {t['visa']:>12,} {t['total']:>12,} {t['vs_dinov3']:>8.2f}x")
    mv, vi = DATASETS["mvtec"], DATASETS["visa"]
    t3 = r["tokens"][DEFAULT_BACKBONE]
    print(f"  images: MVTec AD {mv['images']:,} = {mv['train']:,} train + {mv['test']:,} test ({mv['source']}); "
          f"VisA {vi['images']:,} = {vi['normal']:,} normal + {vi['anomalous']:,} anomalous, 1cls split "
          f"{vi['train']:,} train + {vi['test']:,} test ({vi['source']})")
    print(f"  check: ({mv['images']:,} + {vi['images']:,}) x 784 = {(mv['images'] + vi['images']) * 784:,} "
          f"tokens = {t3['total'] / 1e6:.2f} M ('about 12.6 M' is this truncated; "
          f"{t3['total'] * 1024 * 2 / 1e9:.1f} GB fp16)")
    if args.aux_split != "all":
        print(f"  aux split '{args.aux_split}': " + ", ".join(
            f"{n} {t3['aux_tokens'][n]:,}" for n in DATASETS) + " tokens (dinov3)")

    # 2. store
    for bb, s in r["store"].items():
        pt = s["patch_tokens"]
        print(f"\n[store] {bb}: patch_tokens (fp16 + {100 * LANCE_OVERHEAD:.1f} % Lance overhead) "
              f"MVTec AD {_gb(pt['mvtec'])} GB + VisA {_gb(pt['visa'])} GB = {_gb(pt['total'])} GB")
        for dname, dv in s["directions"].items():
            print(f"  {dname}: one SAE encodes {dv['encoded_tokens']:,} tokens; per (C, k) cell (the same for every "
                  f"C: bytes per activation measured at C = 4096), GB")
            print(f"    {'k':>5} {'sae_codes':>10} {'atoms':>11} {'act. (M)':>10} {'atoms/codes':>12} "
                  f"{'atoms/patch_tokens':>19}")
            C0 = args.Cs[0]
            for k in args.ks:
                c = dv["cells"][f"{C0},{k}"]
                print(f"    {k:>5} {_gb(c['sae_codes']):>10} {_gb(c['atoms']):>11} "
                      f"{c['activations'] / 1e6:>10,.0f} {c['atoms'] / c['sae_codes']:>11.2f}x "
                      f"{c['atoms'] / pt['total']:>18.2f}x")
            g = dv["grid_total"]
            print(f"    grid ({len(args.Cs)}x{len(args.ks)} cells x {args.seeds} seed(s)): sae_codes {_gb(g['sae_codes'])} GB, "
                  f"atoms {_gb(g['atoms'])} GB ({g['activations'] / 1e9:.2f} G activations), "
                  f"sae_models {_gb(g['sae_weights'])} GB")
        g = s["grid_total"]
        print(f"  whole grid, both directions: {_gb(g['total'])} GB = patch_tokens {_gb(g['patch_tokens'])} + sae_codes "
              f"{_gb(g['sae_codes'])} + atoms {_gb(g['atoms'])} + sae_models {_gb(g['sae_weights'])}; "
              f"atoms / sae_codes {g['atoms'] / g['sae_codes']:.2f}x, atoms / patch_tokens "
              f"{g['atoms'] / g['patch_tokens']:.1f}x")
    print(f"  bytes per activation (token x k, all k codes live), measured by bench/atoms.py on 1.0e8 synthetic "
          f"activations (C = 4096, k = 32, 784 patches/image, 6 categories), data + indexes: sae_codes "
          f"{CODES_BYTES_PER_ACTIVATION:g} B, atoms (atom_images + atom_top) {ATOMS_BYTES_PER_ACTIVATION:g} B")
    print("  atoms are built only for the SAEs a user encodes (`spg encode`); a sweep encodes none, so the grid "
          "totals above count codes and atoms as if every cell were encoded")

    # 3. FLOPs + 4. time per (C, k)
    for bb, dirs in r["sae"].items():
        for dname, dv in dirs.items():
            N = dv["tokens_per_epoch"]
            print(f"\n[sae] {bb} {dname}: {N:,} aux tokens per epoch x {dv['epochs']} epochs; per SAE, our kernels' "
                  f"FLOPs vs a dense autograd SAE; GPU time from the dense step model ({SRC_MEASURED}) vs our "
                  f"FLOPs ({src_flops(frac)})")
            print(f"    {'C':>5} {'k':>4} {'k_aux':>5} {'enc TF':>8} {'sparse TF':>9} {'auxk TF':>8} {'select G':>9} "
                  f"{'total TF/ep':>11} {'dense/ours':>10} {'PF 50ep':>8} {'GPU-min':>8} {'flops-min':>9} "
                  f"{'meas/flops':>10}")
            for key, c in dv["cells"].items():
                C, k = (int(v) for v in key.split(","))
                f = c["flops_per_epoch"]
                t = c["seconds"]
                print(f"    {C:>5} {k:>4} {t['k_aux']:>5} {f['encoder'] / 1e12:>8.1f} "
                      f"{(f['decoder'] + f['backward']) / 1e12:>9.2f} {f['auxk'] / 1e12:>8.2f} "
                      f"{(f['select'] + f['auxk_select']) / 1e9:>9.0f} {f['total'] / 1e12:>11.1f} "
                      f"{c['dense_flops_per_epoch'] / f['total']:>9.2f}x {c['flops_all_epochs'] / 1e15:>8.2f} "
                      f"{t['measured_model'] / 60:>8.2f} {t['flops_model'] / 60:>9.2f} "
                      f"{t['measured_model'] / t['flops_model']:>9.1f}x")
    a_s, b_s = a["step_model_a_s_per_token"], a["step_model_b_s_per_token_latent"]
    print(f"  step model: {a_s * 1e9:.1f} ns + C x {b_s * 1e12:.2f} ps per token per SAE, fitted to "
          + ", ".join(f"{r_ / 1e6:.2f} M tok/s @C={C}" for C, r_ in H200_DENSE_STEP)
          + " (fit: " + ", ".join(f"{1 / step_seconds(C, 1) / 1e6:.2f} M" for C, _ in H200_DENSE_STEP)
          + "); k-independent, extrapolated below C = 8192")
    print("  select G: selection ops (main + AuxK top-k over C; memory-bound, timed at the measured top-k rate); "
          "AuxK k_aux = min(d/2, dead fraction x C) at "
          f"{100 * a['dead_fraction']:.0f} % dead; optimizer: Adam over all params per step of 16 images")

    # extraction
    print(f"\n[extract] one H200, both datasets ({sum(dataset_images(n) for n in DATASETS):,} images)")
    print(f"  {'backbone':21s} {'GFLOP/img':>9} {'img/s used':>10} {'img/s FLOPs':>11} {'FLOPs/used':>10} "
          f"{'both (s)':>9}  source")
    for bb, e in r["extraction"].items():
        print(f"  {bb:21s} {e['gflops_per_image']:>9.0f} {e['images_per_s']:>10.0f} {e['flops_images_per_s']:>11.0f} "
              f"{e['flops_images_per_s'] / e['images_per_s']:>9.2f}x {e['both_datasets_s']:>9.1f}  {e['source']}")
    print(f"  (H200 reference: the naive Ray pipeline with its store write ran at {H200_PIPELINE_IMAGES_PER_S:.0f} img/s, "
          f"{H200_PIPELINE_IMAGES_PER_S / 400:.2f}x bare: --extract-efficiency 0.24 plans with that)")

    # 5. sweep
    print(f"\n[sweep] GPU-hours, every trial alone vs shared work (`spg sweep`); extraction and SAE: as in the tables "
          f"above; data pass load at {a['read_bytes_per_s'] / 1e9:.2f} GB/s ({SRC_CPU}); guides "
          f"{_guide_note(frac, a)}")
    print(f"  {'guide set.':>10} {'trials':>6} {'mode':>7} {'extract':>8} {'load':>8} {'SAE':>8} {'guides':>8} "
          f"{'total':>8} {'extr.':>6} {'passes':>6} {'SAEs':>6} {'alone/shared':>12}")
    for gs, p in r["sweep"].items():
        for mode in ("alone", "shared"):
            h = p[f"{mode}_s"]
            c = p["counts"][mode]
            ratio = f"{p['ratio']:>11.2f}x" if mode == "shared" else f"{'1.00x':>12}"
            print(f"  {gs:>10} {p['trials']:>6} {mode:>7} {h['extract'] / 3600:>8.2f} {h['load'] / 3600:>8.2f} "
                  f"{h['sae'] / 3600:>8.2f} {h['guides'] / 3600:>8.3f} {h['total'] / 3600:>8.2f} "
                  f"{c['extractions']:>6} {c['passes']:>6} {c['saes']:>6} {ratio}")
    print("  wall-clock hours on N GPUs (single-GPU jobs, longest first; shared extraction spread over all GPUs); "
          "held = N x wall, idle GPUs included")
    print(f"  {'guide set.':>10} {'GPUs':>5} {'alone h':>8} {'shared h':>9} {'alone/shared':>12} {'alone held':>10} "
          f"{'shared held':>11}")
    for gs, p in r["sweep"].items():
        for n, w in p["wall"].items():
            print(f"  {gs:>10} {n:>5} {w['alone_s'] / 3600:>8.2f} {w['shared_s'] / 3600:>9.2f} {w['ratio']:>11.2f}x "
                  f"{w['alone_held_gpu_s'] / 3600:>10.2f} {w['shared_held_gpu_s'] / 3600:>11.2f}")
    print("  alone: each trial extracts both datasets, loads its aux tokens, trains its SAE (own pass) and one guide "
          "pair; shared: one extraction per (backbone, dataset), one pass per (backbone, aux, seed, C) for every k, "
          "one SAE for all guide settings. Evaluation excluded from both.")


def _guide_note(frac: float, a: dict[str, Any]) -> str:
    return (f"{src_flops(frac)} with a {a['guide_step_floor_s'] * 1e3:g} ms launch floor per step "
            f"({a['guide_steps']} steps)")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default=DEFAULT_BACKBONE,
                    help=f"registry name(s), comma-separated, or 'all' ({', '.join(BACKBONES)})")
    ap.add_argument("--gpus", type=_ints, default=[1, 8], help="GPU counts for the wall-clock table (default 1,8)")
    ap.add_argument("--guide-settings", type=int, default=8,
                    help="guide variants per SAE for the second sweep table (e.g. ReLU + k_g in 8..1024); 1 is always shown")
    ap.add_argument("--Cs", type=_ints, default=list(PAPER_CS))
    ap.add_argument("--ks", type=_ints, default=list(PAPER_KS))
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=PAPER_EPOCHS)
    ap.add_argument("--aux-split", choices=("all", "train"), default="all",
                    help="images of the auxiliary dataset the SAE and guides are fit on")
    ap.add_argument("--encode", choices=("both", "aux"), default="both",
                    help="datasets each SAE's codes/atoms are written for (`spg encode` default: every stored dataset)")
    ap.add_argument("--mfu", type=float, default=None,
                    help="fraction of peak for FLOPs-based figures (default: implied by the measured forwards)")
    ap.add_argument("--extract-efficiency", type=float, default=1.0,
                    help="extraction pipeline rate / bare forward (the H200 reference's naive pipeline with write: 0.24)")
    ap.add_argument("--read-gbps", type=float, default=STORE_READ_BYTES_PER_S / 1e9,
                    help="store -> GPU token load rate of a data pass, GB/s")
    ap.add_argument("--dead-fraction", type=float, default=0.1)
    ap.add_argument("--no-auxk", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the tables")
    args = ap.parse_args(argv)
    args.backbones = list(BACKBONES) if args.backbone == "all" else args.backbone.split(",")
    for bb in args.backbones:
        try:
            backbone_shape(bb)
        except KeyError as exc:  # UnknownBackboneError: one line with the known names, not a traceback
            ap.error(str(exc.args[0] if exc.args else exc))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    r = report(args)
    if args.json:
        json.dump(r, sys.stdout, indent=1, sort_keys=False)
        print()
    else:
        print_tables(r, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
