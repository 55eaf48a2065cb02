"""Stage 2 of SPG (pure PyTorch, no Ray): guide coefficients over a frozen SAE dictionary, scoring, losses."""

from spg_dist.guides.config import GuideConfig, GuideConfigError
from spg_dist.guides.losses import balanced_bce, dice, focal
from spg_dist.guides.model import Guides
from spg_dist.guides.scoring import image_scores, parse_pooling, upsample
from spg_dist.guides.trainer import GuideTrainer, NonFiniteGuideLossError

__all__ = ["GuideConfig", "GuideConfigError", "Guides", "GuideTrainer", "NonFiniteGuideLossError", "balanced_bce",
           "dice", "focal", "image_scores", "parse_pooling", "upsample"]
