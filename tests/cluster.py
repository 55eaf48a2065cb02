"""A real multi-node Ray cluster on this machine, for tests: `ray start --head` and `ray start --address=...` worker
nodes, each with every port explicit (two clusters on one machine collide on the agents' default ports otherwise),
each in its own process group so a test can kill one node (a lost node) or all of them, by PID, without touching any
other Ray on the machine."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
    system_config: dict = field(default_factory=dict)  # the head's RayConfig overrides (e.g. faster health checks)
    procs: list[subprocess.Popen] = field(default_factory=list)
    gcs: str = ""
    dashboard: str = ""
    _spawned: int = 0
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)  # label -> its live worker node
    _temps: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        bindir = str(Path(sys.executable).parent)
        self.ray = os.path.join(bindir, "ray")
        self.env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"], "RAY_AUTH_MODE": "token",
                    **self.env}
        self.env.pop("RAY_ADDRESS", None)

    def _spawn(self, args: list[str]) -> subprocess.Popen:
        path = self.tmp / f"node{self._spawned}.log"
        self._spawned += 1
        log = open(path, "w")
        # every node its own temp dir, as on separate machines: nodes sharing one unpack a job's working_dir into the
        # same folder, each replacing it (rmtree, unpack) the first time it runs a worker of the job, which pulls the
        # folder out from under the job's driver (its cwd) and every worker already started in it. Short (unix
        # socket paths are limited to ~107 characters)
        temp = tempfile.mkdtemp(prefix="rayn", dir="/tmp")
        self._temps.append(temp)
        p = subprocess.Popen([self.ray, "start", "--block", "--disable-usage-stats", f"--temp-dir={temp}", *args],
                             env=self.env,
                             cwd=self.tmp, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        p.log_path = path  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    @staticmethod
    def _blocking(proc: subprocess.Popen) -> bool:
        """``ray start --block`` got past its own startup checks (a node can register with the GCS and still be
        torn down by ``ray start`` timing out its 30 s wait on a loaded machine)."""
        try:
            return "block forever" in proc.log_path.read_text()  # type: ignore[attr-defined]
        except OSError:
            return False

    def start_head(self, timeout: float = 90) -> None:
        port, dash = free_port(), free_port()
        self.gcs, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
        extra = [f"--system-config={json.dumps(self.system_config)}"] if self.system_config else []
        self._spawn(["--head", f"--port={port}", f"--num-cpus={self.head_cpus}", "--include-dashboard=true",
                     f"--dashboard-port={dash}", "--resources={\"head\": 1}", *extra, *_node_ports()])
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
        started again, with fresh ports. ``label`` names a custom resource of the node (1 of it) and the node, for
        ``kill_worker``/``find_worker``; a label may be given again after its node was killed (a replacement).

        Joined means ``ray start --block`` got to blocking: it does so only once the GCS lists the node, and a node
        the GCS listed can still be torn down by ``ray start`` giving up on a slow start (so counting nodes in
        ``ray status`` is not enough; nor does it work while a killed node is not yet marked dead)."""
        resources = f'{{"{label}": 1}}' if label else "{}"
        for attempt in range(attempts):
            proc = self._spawn([f"--address={self.gcs}", f"--num-cpus={cpus}", f"--resources={resources}",
                                *_node_ports()])
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None:
                if self._blocking(proc):
                    time.sleep(1)
                    if proc.poll() is None:
                        if label:
                            self.workers[label] = proc
                        return proc
                time.sleep(1)
            self.kill(proc)
            self.procs.remove(proc)
        raise RuntimeError(f"worker node did not join after {attempts} attempts (see {self.tmp}/node*.log)")

    def kill_worker(self, label: str) -> None:
        """Lose the worker node started with ``label``: SIGKILL its process group (raylet, object store, workers)."""
        proc = self.workers.pop(label)
        self.kill(proc)
        self.procs.remove(proc)

    def ensure_workers(self, labels: list[str], cpus: int = 1) -> None:
        """Start a replacement for every labelled worker node that was killed (or died)."""
        for label in labels:
            if label not in self.workers or self.workers[label].poll() is not None:
                self.add_worker(cpus=cpus, label=label)

    def find_worker(self, actor: str = "", task: str = "", timeout: float = 120) -> str | None:
        """The label of a live labelled worker node running an alive actor whose class name contains ``actor``
        or a running task named ``task``, polled for up to ``timeout`` s; None when none turned up. Asked in a
        child process: the state API reads the auth mode once per process, and this one may be another Ray's."""
        out = subprocess.run([sys.executable, "-c", _FIND_WORKER, self.dashboard, actor, task, str(timeout),
                              *self.workers], env=self.env, capture_output=True, text=True, timeout=timeout + 120)
        found = out.stdout.strip().splitlines()
        return found[-1] if found and found[-1] in self.workers else None

    def worker_nodes(self) -> dict[str, str]:
        """{Ray node id: label} of the live labelled worker nodes."""
        out = subprocess.run([sys.executable, "-c", _FIND_WORKER, self.dashboard, "", "", "60", *self.workers],
                             env=self.env, capture_output=True, text=True, timeout=180)
        lines = out.stdout.strip().splitlines()
        return json.loads(lines[-1]) if lines else {}

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
        for temp in self._temps:
            shutil.rmtree(temp, ignore_errors=True)

    def submit_async(self, entrypoint: list[str], working_dir: Path, log: Path) -> subprocess.Popen:
        """`ray job submit --working-dir DIR -- ENTRYPOINT` without waiting: its output goes to ``log``."""
        cmd = [self.ray, "job", "submit", "--address", self.dashboard, "--working-dir", str(working_dir), "--",
               *entrypoint]
        return subprocess.Popen(cmd, env=self.env, cwd=working_dir, stdout=open(log, "w"), stderr=subprocess.STDOUT)

    def stop_jobs(self) -> None:
        """Stop every job still running (after a test gave up on one)."""
        out = subprocess.run([self.ray, "job", "list", "--address", self.dashboard], env=self.env, capture_output=True,
                             text=True, timeout=60)
        for job_id in set(re.findall(r"raysubmit_[A-Za-z0-9]+", out.stdout)):
            subprocess.run([self.ray, "job", "stop", "--address", self.dashboard, job_id], env=self.env,
                           capture_output=True, text=True, timeout=60)

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


_FIND_WORKER = """
import json, sys, time
from ray.util import state
address, actor, task, timeout, labels = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5:]
deadline = time.time() + timeout
while True:
    try:
        nodes = {n.node_id: n.resources_total for n in
                 state.list_nodes(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)}
        if not actor and not task:  # the live labelled nodes: {node id: label}
            print(json.dumps({node: label for node, res in nodes.items() for label in labels if label in res}))
            sys.exit(0)
        hosts = []
        if actor:
            hosts += [a.node_id for a in state.list_actors(address=address, filters=[("state", "=", "ALIVE")],
                                                         limit=10000, raise_on_missing_output=False)
                      if actor in a.class_name]
        if task:
            hosts += [t.node_id for t in state.list_tasks(address=address, filters=[("name", "=", task),
                                                        ("state", "=", "RUNNING")], raise_on_missing_output=False)]
        for node in hosts:
            for label in labels:
                if label in nodes.get(node, {}):
                    print(label, flush=True)
                    sys.exit(0)
    except Exception as e:  # the dashboard busy or restarting: ask again
        print(f"state api: {e}", file=sys.stderr)
    if time.time() > deadline:
        break
    time.sleep(0.5)
"""
