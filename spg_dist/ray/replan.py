"""Going on after a lost node: which failures mean "a node (or its worker) went away", and how many backbone actors
still fit the cluster that is left.

Ray Data's actor pools restart a dead actor forever and retry its tasks forever by default. When a node is lost
that is worse than failing: the restarted actor takes the last free CPU of the smaller cluster, the decode and
write tasks wait for a CPU that never comes, and the job hangs. The pipelines here run their actors with
``max_restarts=0`` instead, so a lost node fails the pipeline at once; the driver commits what was written, asks
the store what is left (the same skip-what-is-stored logic a re-run uses, so nothing is written twice) and runs
again on the nodes alive, sized to them, a bounded number of times.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

log = logging.getLogger(__name__)

MAX_REPLANS = 3  # a lost node is rare; a fourth in one run is a cluster to fix, not to retry on

# keep an actor dead when its node is lost (see the module docstring); tasks are not retried on it either. Ray
# 2.60 takes these only through map_batches(**ray_remote_args), which it calls deprecated (to go in 2.64, with no
# named parameter for them yet): pipelines pass them inside ``actor_args_allowed()``
ACTOR_ARGS = {"max_restarts": 0, "max_task_retries": 0}


@contextlib.contextmanager
def actor_args_allowed():
    """Where map_batches gets ACTOR_ARGS: its deprecation warning about ``ray_remote_args`` is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        yield


def node_lost(error: BaseException) -> bool:
    """Whether ``error`` (or an error it wraps) says that a node, a worker process or an object on it was lost,
    as opposed to a bug or bad input, which a re-plan would only repeat."""
    import ray.exceptions as rx

    kinds = tuple(getattr(rx, name) for name in (
        "ActorDiedError", "ActorUnavailableError", "NodeDiedError", "WorkerCrashedError", "ObjectLostError",
        "OwnerDiedError", "ObjectReconstructionFailedError", "ObjectFetchTimedOutError", "LocalRayletDiedError",
        "RaySystemError") if hasattr(rx, name))
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kinds):
            return True
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return False


def alive_nodes() -> int:
    """Nodes the GCS counts alive (0 before Ray is started)."""
    import ray

    if not ray.is_initialized():
        return 0
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def settle(alive_before: int, timeout_s: float = 30.0) -> int:
    """Wait until the cluster has noticed the loss (a node counted alive is gone) or ``timeout_s`` passed (a worker
    crashed, not a node); returns the nodes alive. The GCS marks a node dead only after its health checks fail
    (seconds), and a plan made before that would place actors on the dead node again."""
    import time

    deadline = time.monotonic() + timeout_s
    alive = alive_nodes()
    while alive >= alive_before and time.monotonic() < deadline:
        time.sleep(1.0)
        alive = alive_nodes()
    return alive


def note_replan(stage: str, error: BaseException, left: int, attempt: int) -> None:
    """One line saying what happened and what happens next (shown even with --quiet: it is not noise)."""
    nodes = alive_nodes()
    first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
    log.warning("%s: a node or worker was lost (%s: %s); what was written is committed, re-planning the %d images left "
                "on the %d node(s) alive (re-plan %d of %d)", stage, type(error).__name__, first, left, nodes,
                attempt, MAX_REPLANS)
