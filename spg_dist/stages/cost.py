"""The cost model of the paper-scale plan (pure arithmetic, nothing is run): tokens per dataset, store bytes, SAE
FLOPs and GPU time from the figures measured on one H200, extraction time, and the shared-work saving of a sweep.
``bench/capacity.py`` prints it as tables; ``spg reproduce --dry-run`` and ``spg sweep --dry-run`` use
:func:`estimate` for their estimated cost. Every time figure says where it comes from ("measured on one
H200" or "from FLOPs at X % of peak").
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

# ---------------------------------------------------------------------------------------------- constants
# Dataset sizes (images). MVTec AD: Bergmann et al., "MVTec AD - a comprehensive real-world dataset for
# unsupervised anomaly detection", CVPR 2019 (and IJCV 2021): 3,629 train (all normal) + 1,725 test = 5,354.
# VisA: Zou et al., "SPot-the-Difference self-supervised pre-training for anomaly detection and segmentation",
# ECCV 2022: 10,821 images = 9,621 normal + 1,200 anomalous; its split_csv/1cls.csv: 8,659 train + 2,162 test.
DATASETS: dict[str, dict[str, Any]] = {
    "mvtec": {"name": "MVTec AD", "images": 5354, "train": 3629, "test": 1725,
              "source": "Bergmann et al., CVPR 2019 / IJCV 2021"},
    "visa": {"name": "VisA", "images": 10821, "train": 8659, "test": 2162, "normal": 9621, "anomalous": 1200,
             "source": "Zou et al., ECCV 2022 (split_csv/1cls.csv)"},
}
assert all(v["train"] + v["test"] == v["images"] for v in DATASETS.values())
assert DATASETS["visa"]["normal"] + DATASETS["visa"]["anomalous"] == DATASETS["visa"]["images"]

PAPER_CS = (2048, 3072, 4096, 6144, 8192)  # the paper's swept dictionary sizes
PAPER_KS = (8, 16, 32, 64, 128)  # the paper's swept k
PAPER_EPOCHS = 50
PAPER_BATCH_IMAGES = 16
DIRECTIONS = (("visa", "mvtec"), ("mvtec", "visa"))  # (auxiliary, target)
BACKBONES = ("dinov3-vitl16", "dinov2-vitl14", "siglip-l16-384", "openclip-vitl14-336")
DEFAULT_BACKBONE = "dinov3-vitl16"

# Figures measured on one H200 (the reference figures bench/gpu_check.py compares against), random weights, bf16,
# d = 1024.
H200_PEAK_FLOPS = 781e12  # bf16 matmul 8192^3
H200_FORWARD_IMAGES_PER_S = {"dinov3-vitl16": 400.0, "dinov2-vitl14": 452.0, "siglip-l16-384": 768.0}
H200_PIPELINE_IMAGES_PER_S = 95.0  # plain Ray Data pipeline with lance_ray.write_lance, DINOv3 (0.24x bare)
H200_DENSE_STEP = ((8192, 3.5e6), (32768, 1.06e6), (131072, 0.27e6))  # (C, tokens/s), dense TopK, k = 32, bf16
H200_DENSE_STEP_BATCH = 16384
H200_TOPK_S_PER_TOKEN_LATENT = 1.1e-3 / (16384 * 8192)  # torch.topk over 16,384 x 8192 bf16: 1.1 ms
# Measured on this 2-core CPU machine (README, bench/sae.py loader): store -> worker shard, memory mode.
STORE_READ_BYTES_PER_S = 0.44e9
LANCE_OVERHEAD = 0.017  # README, bench/extract.py: 153 kB stored per image for 150.5 kB of fp16 tokens

CODES_BYTES_PER_ACTIVATION = 5.496
"""Stored bytes of ``sae_codes`` per activation (token x k slot), measured by bench/atoms.py on 1.0e8 synthetic
activations (C = 4096, k = 32, 784 patches/image, 6 categories), data + indexes (the table has no index, so data
only). Lance's encodings bring it below the raw int32 index + float32 value (8 B)."""
ATOMS_BYTES_PER_ACTIVATION = 4.421
"""Stored bytes of the atom tables, ``atom_images`` (one row per (atom, image)) + ``atom_top`` (per atom top-N,
overall and per category), per activation of the SAE's sae_codes, measured by bench/atoms.py on 1.0e8 synthetic
activations (C = 4096, k = 32, 784 patches/image, 6 categories), data + scalar indexes (data alone 3.639). Scaled
linearly in activations here; atom_images rows track (atom, image) pairs and atom_top rows atoms x scopes, so
other C, k or patch counts move it somewhat. (The retired ``atom_index``, one row per activation, measured 10.634
B per activation with its indexes.)"""

SRC_MEASURED = "measured on one H200"
SRC_CPU = "measured on the 2-core CPU machine (README)"


def src_flops(mfu: float) -> str:
    return f"from FLOPs at {100 * mfu:.1f} % of peak"


# ----------------------------------------------------------------------------------------------- tokens
def backbone_shape(backbone: str) -> dict[str, int]:
    """Grid side, tokens per image (patch grid only), token dim, layers and prefix tokens from the registry."""
    from spg_dist.backbones.registry import get_config

    cfg = get_config(backbone)
    side = cfg.image_size // cfg.patch_size
    return {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "grid": side, "tokens_per_image": side * side,
            "dim": cfg.dim, "num_layers": cfg.num_layers, "prefix_tokens": cfg.num_prefix_tokens}


def tokens_per_image(backbone: str) -> int:
    return backbone_shape(backbone)["tokens_per_image"]


def dataset_images(dataset: str, split: str = "all") -> int:
    """Images of ``dataset`` in ``split`` ("all", "train" or "test")."""
    return DATASETS[dataset]["images"] if split == "all" else DATASETS[dataset][split]


def tokens_per_dataset(backbone: str, split: str = "all") -> dict[str, int]:
    """Patch tokens of MVTec AD, VisA and both for ``backbone`` (images x grid^2)."""
    t = tokens_per_image(backbone)
    out = {name: dataset_images(name, split) * t for name in DATASETS}
    out["total"] = sum(out.values())
    return out


# ------------------------------------------------------------------------------------------------ store
def store_bytes(tokens: int, d: int, k: int, C: int | None = None, *, overhead: float = LANCE_OVERHEAD,
                codes_bytes: float = CODES_BYTES_PER_ACTIVATION,
                atoms_bytes: float = ATOMS_BYTES_PER_ACTIVATION) -> dict[str, float]:
    """Stored bytes for ``tokens`` tokens of dimension ``d`` and one SAE of width ``C`` with ``k`` codes per token:
    patch_tokens (fp16 + Lance overhead), sae_codes and atoms (atom_images + atom_top), both at the bytes per
    activation measured by bench/atoms.py (all k codes of a token counted live), activations (tokens x k), and the
    SAE's fp32 weights (W_enc, W_dec, b_enc, b_pre) when ``C`` is given. Codes and atoms are modelled as not
    depending on C (measured at C = 4096). Atoms exist only for SAEs a user encodes (`spg encode`)."""
    activations = tokens * k
    out = {"patch_tokens": tokens * d * 2 * (1 + overhead), "sae_codes": activations * codes_bytes,
           "atoms": activations * atoms_bytes, "activations": activations}
    if C is not None:
        out["sae_weights"] = (2 * C * d + C + d) * 4
    return out


# ------------------------------------------------------------------------------------------------ FLOPs
def sae_flops(N: int, d: int, C: int, k: int, *, k_aux: int = 0, batch_tokens: int | None = None) -> dict[str, float]:
    """FLOPs of one pass of ``N`` tokens through a TopK SAE training step with our kernels (spg_dist/sae/kernels.py).

    forward   encoder dense matmul 2*N*d*C (it ranks all C latents; bias add not counted); top-k selection counted
              as N*C ops (one pass over the pre-activations; memory-bound, not matmul FLOPs); sparse decoder
              (embedding bag) 2*N*k*d; loss 3*N*d (subtract, square, sum).
    backward  only the selected latents carry gradients, and each sparse product costs 2*N*k*d:
              decoder: grad of the k values (k rows . grad) + grad of the k W_dec rows            = 4*N*k*d
              encoder: grad of the k W_enc rows (S^T x) + grad x (k W_enc rows, reaches b_pre)     = 4*N*k*d
              i.e. 2x the sparse forward work (2*N*k*d decode + the 2*N*k*d the selected encoder rows
              contribute); the dense [N, C] pre-activations get no backward (a dense autograd SAE pays
              12*N*d*C: see `dense_sae_flops`).
    AuxK      a second selection over C among dead latents (``auxk_select``, N*C ops) and k_aux more latents
              through the same sparse path (``auxk``): decode 2*N*k_aux*d + backward 8*N*k_aux*d; no second matmul.
    optimizer with ``batch_tokens``: Adam ~10 ops per parameter per step, params 2*C*d + C + d, ceil(N/batch) steps.
    """
    out = {"encoder": 2.0 * N * d * C, "select": float(N * C), "decoder": 2.0 * N * k * d, "loss": 3.0 * N * d,
           "backward": 8.0 * N * k * d,
           "auxk_select": float(N * C) if k_aux else 0.0, "auxk": 10.0 * N * k_aux * d,
           "optimizer": 10.0 * (2 * C * d + C + d) * math.ceil(N / batch_tokens) if batch_tokens else 0.0}
    out["total"] = sum(out[key] for key in ("encoder", "select", "decoder", "loss", "backward", "auxk_select", "auxk",
                                            "optimizer"))
    return out


def dense_sae_flops(N: int, d: int, C: int) -> float:
    """The baseline: a dense autograd TopK SAE (bench/sae.py DenseTopK): encoder and decoder [N,d]x[d,C] forward
    (2*N*d*C each) and both backward (grad x + grad W_enc, grad z + grad W_dec: 4*N*d*C each) = 12*N*d*C."""
    return 12.0 * N * d * C


def k_aux_effective(d: int, C: int, dead_fraction: float) -> int:
    """AuxK width: d // 2 (spg_dist.sae.config default) but never more than the dead latents, dead_fraction * C."""
    return min(max(d // 2, 1), round(dead_fraction * C))


def vit_forward_flops(backbone: str) -> float:
    """Matmul FLOPs of one image through the ViT: per block 24*T*d^2 (qkv 6, out 2, MLP 4x: 16) + attention
    4*T^2*d, T = patches + prefix tokens; plus the patch embedding 2*P*(3*p^2)*d."""
    s = backbone_shape(backbone)
    P, d, p = s["tokens_per_image"], s["dim"], s["patch_size"]
    T = P + s["prefix_tokens"]
    return s["num_layers"] * (24.0 * T * d * d + 4.0 * T * T * d) + 2.0 * P * 3 * p * p * d


# ------------------------------------------------------------------------------------------- time model
def fit_step_model(points: Sequence[tuple[int, float]] = H200_DENSE_STEP) -> tuple[float, float]:
    """(a, b) of seconds-per-token = a + b*C, least squares on the relative error, from (C, tokens/s) points."""
    # minimise sum ((a + b*C_i) / y_i - 1)^2 with y_i = 1 / rate_i: weighted normal equations, weights 1 / y_i^2
    rows = [(r, C * r) for C, r in points]  # (1/y_i, C_i/y_i), y_i = 1 / rate_i
    s11 = sum(u * u for u, _ in rows)
    s12 = sum(u * v for u, v in rows)
    s22 = sum(v * v for _, v in rows)
    t1 = sum(u for u, _ in rows)
    t2 = sum(v for _, v in rows)
    det = s11 * s22 - s12 * s12
    return (t1 * s22 - t2 * s12) / det, (s11 * t2 - s12 * t1) / det


STEP_MODEL = fit_step_model()


def step_seconds(C: int, tokens: float, model: tuple[float, float] = STEP_MODEL) -> float:
    """GPU seconds for ``tokens`` tokens of one SAE's training step at width C (the dense TopK step measured on
    the H200, k = 32, no AuxK; the dense step's cost does not depend on k but for the top-k itself)."""
    a, b = model
    return tokens * (a + b * C)


@dataclass(frozen=True)
class CostModel:
    """Rates behind every time figure; the defaults are the measured ones (see the module docstring)."""

    peak_flops: float = H200_PEAK_FLOPS
    mfu: float | None = None  # fraction of peak for FLOPs-based figures; None: median of the measured backbones'
    extract_efficiency: float = 1.0  # pipeline / bare forward (1 = bare; the measured naive pipeline with write: 0.24)
    read_bytes_per_s: float = STORE_READ_BYTES_PER_S
    dead_fraction: float = 0.1  # dead latents AuxK works on (the measured sparsify AuxK figure used 10 %)
    auxk: bool = True
    guide_steps: int = 500  # spg_dist.guides.config.GuideConfig.steps
    guide_batch_images: int = PAPER_BATCH_IMAGES
    guide_step_floor_s: float = 1e-3  # assumed: ~100 small kernels x ~10 us launch per guide step
    step_model: tuple[float, float] = STEP_MODEL

    def fraction(self) -> float:
        return self.mfu if self.mfu is not None else default_mfu(self.peak_flops)


def measured_mfu(backbone: str, peak: float = H200_PEAK_FLOPS) -> float | None:
    """Fraction of peak the measured bare forward of ``backbone`` implies (None without a measured figure)."""
    rate = H200_FORWARD_IMAGES_PER_S.get(backbone)
    return None if rate is None else rate * vit_forward_flops(backbone) / peak


def default_mfu(peak: float = H200_PEAK_FLOPS) -> float:
    """Median of the fractions of peak implied by the measured backbone forwards (one number for every
    FLOPs-based figure)."""
    return statistics.median(measured_mfu(b, peak) for b in H200_FORWARD_IMAGES_PER_S)


def extract_rate(backbone: str, costs: CostModel = CostModel()) -> tuple[float, str]:
    """Images/s of extraction on one H200 and where the figure comes from."""
    if backbone in H200_FORWARD_IMAGES_PER_S:
        rate, src = H200_FORWARD_IMAGES_PER_S[backbone], SRC_MEASURED
    else:
        rate, src = costs.fraction() * costs.peak_flops / vit_forward_flops(backbone), src_flops(costs.fraction())
    if costs.extract_efficiency != 1.0:
        src += f" x {costs.extract_efficiency:g} pipeline efficiency"
    return rate * costs.extract_efficiency, src


def extract_seconds(backbone: str, images: int, costs: CostModel = CostModel()) -> float:
    return images / extract_rate(backbone, costs)[0]


def load_seconds(tokens: int, d: int, costs: CostModel = CostModel()) -> float:
    """One data pass's load of fp16 tokens from the store into GPU memory (memory mode: once per pass)."""
    return tokens * d * 2 / costs.read_bytes_per_s


def sae_seconds(N: int, d: int, C: int, k: int, costs: CostModel = CostModel(),
                batch_tokens: int = PAPER_BATCH_IMAGES * 784) -> dict[str, float]:
    """GPU seconds to push ``N`` tokens (all epochs) through one SAE: the measured dense-step model, plus AuxK (a
    second top-k at the measured top-k rate and its sparse FLOPs at the fraction of peak); alongside, our kernels'
    FLOPs at the fraction of peak (for comparison, not used in the plan)."""
    k_aux = k_aux_effective(d, C, costs.dead_fraction) if costs.auxk else 0
    fl = sae_flops(N, d, C, k, k_aux=k_aux, batch_tokens=batch_tokens)
    rate = costs.fraction() * costs.peak_flops
    aux = (N * C * H200_TOPK_S_PER_TOKEN_LATENT + 10.0 * N * k_aux * d / rate) if k_aux else 0.0
    main = step_seconds(C, N, costs.step_model)
    return {"measured_model": main + aux, "dense_step": main, "auxk": aux, "flops_model": fl["total"] / rate,
            "k_aux": k_aux}


def guide_seconds(backbone: str, C: int, costs: CostModel = CostModel()) -> float:
    """One guide pair's training: per step, guides 2 x D z (2*C*d each) and per token two cosines (~6*d), per
    pixel of the upsampled map ~30 ops (bilinear, softmax, focal, Dice); backward 2x; each step at least the
    launch floor."""
    s = backbone_shape(backbone)
    d, P, px = s["dim"], s["tokens_per_image"], s["image_size"] ** 2
    per_step = 3.0 * (2 * 2 * C * d + costs.guide_batch_images * (P * 6 * d + px * 30))
    step = max(per_step / (costs.fraction() * costs.peak_flops), costs.guide_step_floor_s)
    return costs.guide_steps * step


# --------------------------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Grid:
    """A sweep: trials = backbones x directions x Cs x ks x seeds x guide settings (one layer: the last)."""

    backbones: tuple[str, ...] = (DEFAULT_BACKBONE,)
    directions: tuple[tuple[str, str], ...] = DIRECTIONS
    Cs: tuple[int, ...] = PAPER_CS
    ks: tuple[int, ...] = PAPER_KS
    seeds: int = 1
    guide_settings: int = 1
    epochs: int = PAPER_EPOCHS
    aux_split: str = "all"  # which images of the auxiliary dataset the SAE and guides are fit on
    encode: str = "both"  # which datasets `spg encode` codes for each SAE (its default: every stored dataset)

    @property
    def trials(self) -> int:
        return (len(self.backbones) * len(self.directions) * len(self.Cs) * len(self.ks) * self.seeds
                * self.guide_settings)


def lpt_makespan(durations: Sequence[float], gpus: int) -> float:
    """Wall-clock of independent single-GPU jobs on ``gpus`` GPUs, longest first onto the least-loaded GPU."""
    loads = [0.0] * max(gpus, 1)
    for t in sorted(durations, reverse=True):
        heapq.heapreplace(loads, loads[0] + t)
    return max(loads)


def plan(grid: Grid = Grid(), gpus: Sequence[int] = (1, 8), costs: CostModel = CostModel()) -> dict[str, Any]:
    """GPU-seconds of the grid run trial by trial ("alone") and as `spg sweep` shares work ("shared"), by part,
    with the units counted, and the wall-clock on each GPU count (LPT scheduling of single-GPU jobs; shared
    extraction spreads its images over all GPUs)."""
    alone = {"extract": 0.0, "load": 0.0, "sae": 0.0, "guides": 0.0}
    shared = dict(alone)
    counts = {"alone": {"extractions": 0, "passes": 0, "saes": 0, "guides": 0},
              "shared": {"extractions": 0, "passes": 0, "saes": 0, "guides": 0}}
    trial_s: list[float] = []
    pass_s: list[float] = []
    for bb in grid.backbones:
        d = backbone_shape(bb)["dim"]
        per_image = tokens_per_image(bb)
        ext = {name: extract_seconds(bb, dataset_images(name), costs) for name in DATASETS}
        needed = sorted({name for pair in grid.directions for name in pair})
        shared["extract"] += sum(ext[n] for n in needed)
        counts["shared"]["extractions"] += len(needed)
        for aux, target in grid.directions:
            N_aux = dataset_images(aux, grid.aux_split) * per_image
            load = load_seconds(N_aux, d, costs)
            ext_trial = ext[aux] + ext[target]
            for _seed in range(grid.seeds):
                for C in grid.Cs:
                    g = guide_seconds(bb, C, costs)
                    this_pass = load
                    counts["shared"]["passes"] += 1
                    shared["load"] += load
                    for k in grid.ks:
                        sae = sae_seconds(N_aux * grid.epochs, d, C, k, costs,
                                          PAPER_BATCH_IMAGES * per_image)["measured_model"]
                        shared["sae"] += sae
                        shared["guides"] += grid.guide_settings * g
                        this_pass += sae + grid.guide_settings * g
                        counts["shared"]["saes"] += 1
                        counts["shared"]["guides"] += grid.guide_settings
                        for _gs in range(grid.guide_settings):
                            alone["extract"] += ext_trial
                            alone["load"] += load
                            alone["sae"] += sae
                            alone["guides"] += g
                            trial_s.append(ext_trial + load + sae + g)
                            counts["alone"]["extractions"] += 2
                            counts["alone"]["passes"] += 1
                            counts["alone"]["saes"] += 1
                            counts["alone"]["guides"] += 1
                    pass_s.append(this_pass)
    alone["total"] = sum(alone.values())
    shared["total"] = sum(shared.values())
    wall = {}
    for n in gpus:
        a = lpt_makespan(trial_s, n)
        s = shared["extract"] / n + lpt_makespan(pass_s, n)
        wall[str(n)] = {"alone_s": a, "shared_s": s, "ratio": a / s, "alone_held_gpu_s": a * n,
                        "shared_held_gpu_s": s * n}
    return {"grid": asdict(grid), "trials": grid.trials, "alone_s": alone, "shared_s": shared, "counts": counts,
            "ratio": alone["total"] / shared["total"], "wall": wall}


# ------------------------------------------------------------------------------------------------ report


def estimate(plan: Any, gpus: int = 1, costs: "CostModel | None" = None) -> dict[str, Any]:
    """GPU time of a reproduction plan (``spg_dist.stages.reproduce.ReproducePlan``) on ``gpus`` H200s: extraction
    of every (backbone, dataset) it names, one SAE data pass per (backbone, direction, seed) and the guides; datasets
    of the MVTec AD / VisA sizes unless they are local folders whose image count is known."""
    costs = costs or CostModel()
    out: dict[str, Any] = {"gpus": gpus, "items": []}
    total = 0.0
    for backbone in plan.backbones:
        base = backbone.split("@")[0]
        shape = backbone_shape(base)
        for name, d in plan.datasets.items():
            images = dataset_images(d.layout) if d.layout in DATASETS else 0
            sec = extract_seconds(base, images, costs)
            out["items"].append({"what": f"extract {name} with {base}", "images": images, "seconds": round(sec, 1),
                                 "source": extract_rate(base, costs)[1]})
            total += sec
        for direction in plan.directions:
            aux_name = direction.split("->")[0].strip()
            layout = plan.datasets[aux_name].layout
            n = dataset_images(layout) * tokens_per_image(base) if layout in DATASETS else 0
            sae = sae_seconds(int(n * plan.stage1.epochs), shape["dim"], plan.C, plan.k, costs)["measured_model"]
            out["items"].append({"what": f"SAE C={plan.C} k={plan.k} on {aux_name} ({plan.stage1.epochs:g} epochs) "
                                         f"x {plan.seeds} seed(s)", "tokens_per_epoch": n,
                                 "seconds": round(plan.seeds * sae, 1), "source": SRC_MEASURED})
            total += plan.seeds * sae
    out["total_gpu_hours"] = round(total / 3600, 2)
    out["wall_hours"] = round(total / 3600 / max(gpus, 1), 2)
    out["note"] = ("extraction and SAE passes on H200s from the figures measured on one H200; guides and evaluation "
                   "are small next to them and left out; a dataset of unknown size counts 0")
    return out
