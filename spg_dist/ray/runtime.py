"""Connecting to Ray the way each entry point needs: a local cluster, ``--address``, or a submitted job.

One runtime per command: :func:`ensure_ray` starts (or joins) Ray the first time a stage has work for it and reuses
it for every later stage of the same process; a stage with nothing left to do never calls it, so a re-run that
recomputes nothing starts no Ray at all. ``ray`` itself is imported only here, on that first call.

By default Ray's own chatter is off (its INFO/WARNING log lines, the "Started a local Ray instance" banner, Ray
Data's console log, the driver core worker's C++ log lines such as the error-level note every Ray Data actor pool
triggers about restartable actors with constructor arguments in the object store), while what our workers print
still reaches the driver (``log_to_driver`` stays on): the lines a worker prints are ours, and a worker's traceback
is never lost. ``verbose=True`` keeps Ray's defaults.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# What the CLI sets once per command (configure_ray), used by every ensure_ray call that does not say otherwise.
_SETTINGS: dict = {"quiet": True, "verbose": False}
# Ray loggers quieted on the driver unless verbose (Ray Data's console handler separately: it has its own level).
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air", "lance_ray")
# What our worker code prints starts with one of these; forwarded lines without one are Ray's (its Train controller,
# Ray Data's actors, C++ log lines of other processes) and are dropped from the console unless verbose (every worker's
# output stays in the session's log files, logs/worker-*.out|err).
OUR_PREFIXES = ("[spg]", "[train-sae]", "[extract]", "[encode]", "[sweep]")


def configure_ray(*, quiet: bool | None = None, verbose: bool | None = None) -> None:
    """Record how the Ray runtime of this command will be set up, without starting it (what the CLI calls once per
    command: a stage that has nothing to do then still starts no Ray)."""
    if quiet is not None:
        _SETTINGS["quiet"] = bool(quiet)
    if verbose is not None:
        _SETTINGS["verbose"] = bool(verbose)


def ray_settings() -> dict:
    return dict(_SETTINGS)


def ensure_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool | None = None,
               verbose: bool | None = None) -> None:
    """Join the cluster named by ``address``/``RAY_ADDRESS`` (as ``ray job submit`` sets), else start one locally.

    Idempotent: a second call in the same process reuses the runtime (one runtime per command, whatever number of
    stages it runs). A local cluster gets an explicit ``num_cpus`` so Ray never oversubscribes a small machine.
    ``quiet`` (default, or what :func:`configure_ray` recorded): Ray's own log lines off, ours kept; ``verbose``:
    Ray's defaults (INFO logs, banner, Ray Data's console log, C++ log lines).
    """
    import ray

    verbose = _SETTINGS["verbose"] if verbose is None else bool(verbose)
    quiet = (_SETTINGS["quiet"] if quiet is None else bool(quiet)) and not verbose
    if ray.is_initialized():
        return
    _quiet_python_loggers(verbose, quiet)
    kwargs: dict = dict(log_to_driver=True)
    if not verbose:
        kwargs["logging_level"] = logging.ERROR if quiet else logging.WARNING
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
    import ray.data  # imported after init: its import resets the "ray.data" logger (configure_logging)

    _quiet_python_loggers(verbose, quiet)
    if not verbose:
        _forward_our_lines_only()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own tqdm bar counts images; Ray's per-operator bars are noise here
    ctx.execution_options.preserve_order = False
    if not verbose:
        ctx.print_on_execution_start = False  # "Starting execution of Dataset ..." / "Execution plan ..."


def _quiet_python_loggers(verbose: bool, quiet: bool) -> None:
    """Ray's Python loggers on the driver at ERROR (quiet) or WARNING; for Ray Data only its console handler (its
    session log file keeps everything)."""
    if verbose:
        return
    level = logging.ERROR if quiet else logging.WARNING
    for name in RAY_LOGGERS:
        if name != "ray.data":
            logging.getLogger(name).setLevel(level)
    for h in logging.getLogger("ray.data").handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) \
                and type(h).__name__ != "SessionFileHandler":
            h.setLevel(level)


def _forward_our_lines_only() -> None:
    """Keep Ray's forwarding of worker output (``log_to_driver``) but pass on only the lines our code prints."""
    try:
        import ray._private.worker as rw

        dispatcher = rw.global_worker_stdstream_dispatcher
        original = dict(dispatcher.handlers)["ray_print_logs"]
    except (AttributeError, KeyError, ImportError, TypeError, ValueError):
        return
    if getattr(original, "_spg_filter", False):
        return

    def ours(data: dict) -> None:
        lines = [line for line in data.get("lines", ()) if str(line).lstrip().startswith(OUR_PREFIXES)]
        if lines:
            original({**data, "lines": lines})

    ours._spg_filter = True  # type: ignore[attr-defined]
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", ours)


def start_watchdog() -> int | None:
    """Start :mod:`spg_dist.ray.watchdog` for the local runtime this process just started; returns its PID."""
    import subprocess

    import ray

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
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))
