"""spg_dist: distributed SAE-based zero-shot anomaly detection (Sparse-Projected Guides) on Ray and LanceDB.

Packages (one job each): ``data`` (dataset layouts, the synthetic generator), ``backbones`` (frozen encoders),
``store`` (the LanceDB feature store: one module per table family), the method modules ``sae``, ``guides``,
``detectors`` and ``evaluation`` (pure PyTorch/NumPy), ``stages`` (Ray-free stage functions: guides, the one
evaluation loop, detect, demo), ``ray`` (all Ray code), ``viz`` (pictures) and ``cli`` (the ``spg`` command).
"""

import os

# Lance's Rust logger warns about benign things (a table created on first write, empty k-means clusters on small
# banks); keep its output to errors unless the user asked for more. Must be set before lance is imported.
os.environ.setdefault("LANCE_LOG", "error")
os.environ.setdefault("LANCEDB_LOG", "error")

__version__ = "0.2.0"
