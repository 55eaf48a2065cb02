"""A real multi-node Ray cluster on this machine, for tests: `ray start --head` and `ray start --address=...` worker
nodes, each with every port explicit (two clusters on one machine collide on the agents' default ports otherwise),
each in its own process group so a test can kill one node (a lost node) or all of them, by PID, without touching any
other Ray on the machine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    lo = free_port()
    base = 20000 + (lo % 20000)  # a worker port range of our own per node
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--min-worker-port={base}", f"--max-worker-port={base + 199}"]


@dataclass
class LocalCluster:
    """Head + worker nodes started as `ray start --block` processes; ``stop()`` kills what it started."""

    tmp: Path
    head_cpus: int = 1
    env: dict = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    gcs: str = ""
    dashboard: str = ""

    def __post_init__(self) -> None:
        bindir = str(Path(sys.executable).parent)
        self.ray = os.path.join(bindir, "ray")
        self.env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"], "RAY_AUTH_MODE": "token",
                    **self.env}
        self.env.pop("RAY_ADDRESS", None)

    def _spawn(self, args: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"node{len(self.procs)}.log", "w")
        p = subprocess.Popen([self.ray, "start", "--block", "--disable-usage-stats", *args], env=self.env,
                             cwd=self.tmp, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def start_head(self, timeout: float = 90) -> None:
        port, dash = free_port(), free_port()
        self.gcs, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
        self._spawn(["--head", f"--port={port}", f"--num-cpus={self.head_cpus}", "--include-dashboard=true",
                     f"--dashboard-port={dash}", "--resources={\"head\": 1}", *_node_ports()])
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.dashboard + "/api/version", timeout=2)
                return
            except urllib.error.HTTPError:  # answering at all (e.g. 401 before auth) means the server is up
                return
            except OSError:
                time.sleep(1)
        self.stop()
        raise RuntimeError("ray head did not start within its timeout")

    def add_worker(self, cpus: int = 1, label: str = "", attempts: int = 3) -> subprocess.Popen:
        """Start a worker node and wait until it has joined; a node that times out starting (a loaded machine) is
        started again, with fresh ports."""
        resources = f'{{"{label}": 1}}' if label else "{}"
        want = self.alive_nodes() + 1
        for attempt in range(attempts):
            proc = self._spawn([f"--address={self.gcs}", f"--num-cpus={cpus}", f"--resources={resources}",
                                *_node_ports()])
            deadline = time.time() + 90
            while time.time() < deadline and proc.poll() is None:
                if self.alive_nodes() >= want:
                    return proc
                time.sleep(2)
            self.kill(proc)
            self.procs.remove(proc)
        raise RuntimeError(f"worker node did not join after {attempts} attempts (see {self.tmp}/node*.log)")

    def alive_nodes(self) -> int:
        out = subprocess.run([self.ray, "status", f"--address={self.gcs}"], env=self.env, capture_output=True,
                             text=True, timeout=60)
        if out.returncode != 0:
            return 0
        active = out.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return active.count("node_")

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.alive_nodes() >= n:
                return
            time.sleep(2)
        raise RuntimeError(f"cluster did not reach {n} nodes (see {self.tmp}/node*.log)")

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Kill one node's whole process group (its raylet and workers): a lost node."""
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def stop(self) -> None:
        for p in reversed(self.procs):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue

    def submit(self, entrypoint: list[str], working_dir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir DIR -- ENTRYPOINT`, retrying only the head's late job agent."""
        cmd = [self.ray, "job", "submit", "--address", self.dashboard, "--working-dir", str(working_dir), "--",
               *entrypoint]
        deadline = time.time() + 60
        while True:
            out = subprocess.run(cmd, env=self.env, cwd=working_dir, capture_output=True, text=True, timeout=timeout)
            if out.returncode == 0 or "No available agent" not in out.stdout + out.stderr or time.time() > deadline:
                return out
            time.sleep(3)
