"""Progress lines from Ray workers to the driver, while the driver waits in a blocking call (``trainer.fit()``).

Ray Train reports metrics to the driver only at checkpoints and at the end, and what a worker prints reaches the
driver only through Ray's log forwarding (prefixed, deduplicated, and re-routed by Ray Train's print patch). So the
workers put their lines into a small actor (:class:`ProgressChannel`, no CPU) and a driver thread prints them as they
come (every ``period`` seconds), on stderr, unprefixed. Without a channel (a worker run in-process, a sweep trial)
the line is printed to stderr where the worker runs.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any, Callable, Iterator


RELAY_PERIOD_S = 1.0  # how often the driver prints what workers sent


class ProgressChannel:
    """Lines put by workers, taken by the driver (fire-and-forget puts: a worker never waits on it)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def put(self, line: str) -> None:
        self.lines.append(line)
        del self.lines[:-1000]  # a driver that stopped taking never makes this grow without bound

    def take(self) -> list[str]:
        out, self.lines = self.lines, []
        return out


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def emit(channel: Any, line: str) -> None:
    """Send ``line`` to the driver through ``channel`` (an actor handle), or print it here when there is none."""
    if channel is None:
        _stderr(line)
        return
    try:
        channel.put.remote(line)
    except Exception:  # noqa: BLE001 - the channel died with its driver: progress is never worth failing a step
        _stderr(line)


@contextlib.contextmanager
def relay(echo: Callable[[str], None] | None = None, period: float | None = None, enabled: bool = True
          ) -> Iterator[Any]:
    """A :class:`ProgressChannel` actor for the duration of the block and a driver thread printing its lines with
    ``echo`` (default: stderr); yields the handle to pass to workers (None when not ``enabled``)."""
    if not enabled:
        yield None
        return
    import ray

    echo = echo or _stderr
    period = RELAY_PERIOD_S if period is None else period
    channel = ray.remote(num_cpus=0, max_restarts=0)(ProgressChannel).remote()
    stop = threading.Event()

    def drain() -> None:
        with contextlib.suppress(Exception):
            for line in ray.get(channel.take.remote(), timeout=30):
                echo(line)

    def loop() -> None:
        while not stop.wait(period):
            drain()

    thread = threading.Thread(target=loop, name="spg-progress", daemon=True)
    thread.start()
    try:
        yield channel
    finally:
        stop.set()
        thread.join(timeout=period + 30)
        drain()  # the last lines (the final step) before the caller prints its summary
        with contextlib.suppress(Exception):
            ray.kill(channel)


__all__ = ["ProgressChannel", "emit", "relay"]
