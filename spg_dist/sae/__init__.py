"""TopK sparse autoencoders for SPG Stage 1, in pure PyTorch (no Ray, no torch.distributed).

Modules, one job each:
  config       SAEConfig, TrainConfig, SAEConfigError (JSON round-trip, validation)
  preprocess   Preprocessing: the one function that maps raw tokens into an SAE's input space
  selection    sparsifiers (TopK, BatchTopK, inference threshold)
  kernels      fused sparse encoder (autograd.Function with a sparse backward), embedding-bag decoder
  initializers random unit-norm atoms, geometric median
  model        TopKSAE (+ SAEOutput), safetensors save/load
  tracker      DeadLatentTracker (dead latents, firing counts, merging across workers)
  metrics      nmse, explained_variance, l0, firing-frequency histogram (counts and PNG)
  multi        MultiSAE: the SAEs of one pass as one module (what DDP wraps)
  trainer      MultiSAETrainer (several SAEs, one pass), NonFiniteLossError
  checkpoint   trainer checkpoints as safetensors + JSON
  serialization safetensors bytes/files with JSON metadata
"""

from spg_dist.sae.checkpoint import load_checkpoint, load_sae, read_meta, save_checkpoint
from spg_dist.sae.config import SAEConfig, SAEConfigError, TrainConfig, config_diff
from spg_dist.sae.initializers import geometric_median
from spg_dist.sae.metrics import explained_variance, firing_frequency_histogram_png, l0, nmse
from spg_dist.sae.model import SAEOutput, TopKSAE
from spg_dist.sae.preprocess import Preprocessing
from spg_dist.sae.tracker import DeadLatentTracker
from spg_dist.sae.multi import MultiSAE
from spg_dist.sae.trainer import MultiSAETrainer, NonFiniteLossError

__all__ = [
    "DeadLatentTracker",
    "MultiSAE",
    "MultiSAETrainer",
    "NonFiniteLossError",
    "Preprocessing",
    "SAEConfig",
    "SAEConfigError",
    "SAEOutput",
    "TopKSAE",
    "TrainConfig",
    "config_diff",
    "explained_variance",
    "firing_frequency_histogram_png",
    "geometric_median",
    "l0",
    "load_checkpoint",
    "load_sae",
    "nmse",
    "read_meta",
    "save_checkpoint",
]
