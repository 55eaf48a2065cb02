"""All of spg_dist's Ray code: Ray Data pipelines (extraction), and later Ray Train loops and sweeps.

The method modules never import Ray; this package wraps them.
"""

from spg_dist.distributed.extract import ExtractResult, extract

__all__ = ["ExtractResult", "extract"]
