"""Connecting to Ray the way each entry point needs: a local cluster, ``--address``, or a submitted job."""

from __future__ import annotations

import logging
import os
import warnings

import ray


def ensure_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Join the cluster named by ``address``/``RAY_ADDRESS`` (as ``ray job submit`` sets), else start one locally.

    A local cluster gets an explicit ``num_cpus`` so Ray never oversubscribes a small machine.
    """
    if ray.is_initialized():
        return
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=not quiet) if quiet else {}
    address = address or os.environ.get("RAY_ADDRESS")
    with warnings.catch_warnings():
        # Ray starts its daemons with fork+exec; lance/lancedb warn about fork although nothing of theirs is shared.
        warnings.filterwarnings("ignore", message=".*fork.*")
        if address:
            ray.init(address=address, **kwargs)
        else:
            # "local": a fresh cluster even if another one runs here (ray.init() alone would join that one)
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, **kwargs)
            start_watchdog()
    if quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own tqdm bar counts images; Ray's per-operator bars are noise here
    ctx.execution_options.preserve_order = False


def start_watchdog() -> int | None:
    """Start :mod:`spg_dist.ray.watchdog` for the local runtime this process just started; returns its PID."""
    import subprocess
    import sys

    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return None
    pids = [p.process.pid for procs in node.all_processes.values() for p in procs if p.process is not None]
    if not pids:
        return None
    proc = subprocess.Popen([sys.executable, "-m", "spg_dist.ray.watchdog", str(os.getpid()), *map(str, pids)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc.pid


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))
