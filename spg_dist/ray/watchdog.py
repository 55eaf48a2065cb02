"""A watchdog for a local Ray runtime: when the driver that started it dies (SIGKILL, OOM, a closed terminal), kill
the runtime's processes too, so nothing of ours outlives a killed driver for long.

Why: ``ray.init(address="local")`` starts a GCS server, a raylet, a dashboard and monitors that ignore SIGTERM and
stay up when the driver is killed without running its ``atexit`` shutdown. :func:`spg_dist.ray.runtime.ensure_ray`
starts this watchdog as its own process (a new session, so a Ctrl-C of the driver does not reach it) with the
driver's PID and the runtime's process IDs; it polls the driver and, once it is gone, SIGKILLs those processes and
their process groups (worker processes exit when their raylet does). A normal ``ray.shutdown()`` makes it exit too.

    python -m spg_dist.ray.watchdog DRIVER_PID PID [PID ...]
"""

from __future__ import annotations

import os
import signal
import sys
import time


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def descendants(roots: set[int]) -> set[int]:
    """Every live process below ``roots`` (the raylet's agents and workers), from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, todo = set(), list(roots)
    while todo:
        p = todo.pop()
        for child, parent in parents.items():
            if parent == p and child not in out:
                out.add(child)
                todo.append(child)
    return out


def watch(driver: int, pids: list[int], poll: float = 0.5) -> int:
    """Wait for ``driver`` to die, keeping track of the runtime's processes and everything they start (their
    parent dies with them, so they are remembered while it lives); then kill them all."""
    known = set(pids)
    while alive(driver):
        if not any(alive(p) for p in pids):  # the runtime was shut down normally
            return 0
        known |= descendants(set(pids))
        time.sleep(poll)
    known |= descendants(set(pids))
    killed = 0
    for pid in sorted(known):
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def main(argv: list[str]) -> int:
    driver, *pids = (int(a) for a in argv)
    watch(driver, pids)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
