"""Shared fixtures: one small Ray cluster for the whole session, offline hub, tiny datasets."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for every test that needs it (2 CPUs: this machine's size), shut down at the end."""
    import ray

    from spg_dist.ray.runtime import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_mvtec(tmp_path_factory):
    """A small MVTec-layout synthetic dataset (2 categories, 64 px), shared by the extraction tests."""
    from spg_dist.data.synth import synthesize

    root = tmp_path_factory.mktemp("data") / "synth_mvtec"
    synthesize(root, layout="mvtec", seed=0, image_size=64, n_train=2, n_test_good=1, n_test_bad=2,
               categories=None)
    return root
