"""Pictures of what the store holds (matplotlib, Agg backend: works headless, on workers and in CI)."""

from spg_dist.viz.atoms import atom_gallery_figure, atom_gallery_png, atom_stats_png, upsample_bilinear
from spg_dist.viz.overlays import method_overlays
from spg_dist.viz.sae_figures import short_sae_label, write_sae_figures

__all__ = ["atom_gallery_figure", "atom_gallery_png", "atom_stats_png", "method_overlays", "short_sae_label",
           "upsample_bilinear", "write_sae_figures"]
