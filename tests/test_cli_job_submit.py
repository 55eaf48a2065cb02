"""The way a user runs extraction on a cluster: `ray start --head`, then `ray job submit --working-dir . --
python jobs/extract.py ...`, and the rows land in the store. (Named to run before the session Ray fixture
starts; the head is started with --block in its own process group and stopped by killing that group, so it
never touches another Ray on the machine.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from spg_dist.data.spec import list_records
from spg_dist.store import Store

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def head_node(tmp_path):
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"]}  # job drivers use this python
    env.pop("RAY_ADDRESS", None)
    env["RAY_AUTH_MODE"] = "token"  # Ray 2.60 secures new clusters with a token (~/.ray/auth_token); clients must opt in
    port, dash, agent, agent_grpc, runtime_agent, metrics = (_free_port() for _ in range(6))
    # every port explicit: the session's Ray (other tests) already holds the agent defaults (52365, ...), and a
    # head whose job agent cannot bind answers every submission with "No available agent"
    proc = subprocess.Popen([os.path.join(bindir, "ray"), "start", "--head", "--block", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=true", f"--dashboard-port={dash}",
                             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                             f"--runtime-env-agent-port={runtime_agent}", f"--metrics-export-port={metrics}",
                             "--disable-usage-stats"], env=env, cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # answering at all (e.g. 401 before auth) means the server is up
            break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail("ray head did not start within 60 s")
    yield url, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    os.killpg(proc.pid, signal.SIGKILL)  # whatever of the head's group is still up
    proc.wait()


def test_ray_job_submit_extract(head_node, synth_mvtec, tmp_path):
    url, env = head_node
    store = tmp_path / "store"
    cmd = [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit", "--address", url,
           "--working-dir", str(ROOT), "--", "python", "jobs/extract.py", "--dataset", f"mvtec:{synth_mvtec}",
           "--backbone", "tiny-dinov3", "--image-size", "64", "--store", str(store), "--quiet"]
    deadline = time.time() + 60
    while True:  # the head's job agent can come up seconds after its HTTP server: retry only that refusal
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
        if out.returncode == 0 or "No available agent" not in out.stdout + out.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "patch_tokens rows written" in out.stdout
    assert Store(store).count("patch_tokens") == len(list_records(f"mvtec:{synth_mvtec}"))
