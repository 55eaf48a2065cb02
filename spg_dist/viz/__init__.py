"""Pictures of what the store holds (matplotlib, Agg backend: works headless, on workers and in CI)."""

from spg_dist.viz.atoms import atom_gallery_png, atom_stats_png, upsample_bilinear

__all__ = ["atom_gallery_png", "atom_stats_png", "upsample_bilinear"]
