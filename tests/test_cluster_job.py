"""A real multi-process, two-node Ray cluster: `ray job submit` runs jobs/train.py, then jobs/score.py.

This is what users run against a cluster (or KubeRay): the working dir is uploaded, the entrypoint is a
thin script, and the result is the same JSON line as the local CLI. The cluster is started with its own
ports and temp dir, and stopped by pid (never `ray stop`, which would kill every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.helpers import REPO, free_port, tiny_overrides

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).with_name("ray"))


def _run(args: list[str], env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _cluster_pids(temp_dir: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture
def cluster(tmp_path_factory):
    temp_dir = str(tmp_path_factory.mktemp("raytmp", numbered=True))  # unique: identifies its processes
    gcs_port, dash_port = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MMRAY_DEBUG": "1"}
    env.pop("RAY_ADDRESS", None)
    # Every listening port explicit: other Ray instances on this machine (the test session's own) hold
    # the defaults, e.g. the dashboard agent's 52365.
    def ports() -> list[str]:
        return [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}"]  # fmt: skip

    head = [RAY, "start", "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
            f"--ray-client-server-port={free_port()}", "--num-cpus=2", f"--temp-dir={temp_dir}",
            "--disable-usage-stats", *ports()]  # fmt: skip
    try:
        _run(head, env)
        # Its own temp dir too: two nodes on one machine must not share runtime_resources (each node's
        # runtime-env agent garbage-collects working_dir packages it thinks are unused).
        _run([RAY, "start", f"--address=127.0.0.1:{gcs_port}", "--num-cpus=1", f"--temp-dir={temp_dir}-node2",
              *ports()], env)  # fmt: skip
        yield {"dashboard": f"http://127.0.0.1:{dash_port}", "env": env}
    finally:
        procs = _cluster_pids(temp_dir)  # the second node's "<temp_dir>-node2" matches too
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            p.kill()


def _submit(cluster: dict, entrypoint: list[str]) -> dict:
    runtime_env = {"excludes": [".venv/", ".git/", "work/", "runs/", "**/__pycache__/", ".notes/"]}
    proc = _run(
        [RAY, "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO),
         "--runtime-env-json", json.dumps(runtime_env), "--", sys.executable, *entrypoint],
        cluster["env"], timeout=600,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stdout[-3000:]
    return json.loads(lines[-1])


def test_ray_job_submit_trains_and_scores_on_two_nodes(cluster, tmp_path):
    from mmray.data.synthetic import make_dataset

    data = make_dataset(tmp_path / "data", rows=400, seed=3)
    trained = _submit(cluster, ["jobs/train.py", "--config", "configs/demo.yaml",
                                *tiny_overrides(data, tmp_path / "runs", **{"train.epochs": 2})])  # fmt: skip
    assert Path(trained["checkpoint"], "model.safetensors").exists()
    assert trained["metrics"]["data"]["train"]["rows_in"] == data["train"]["rows"]
    scored = _submit(cluster, ["jobs/score.py", "--checkpoint", trained["checkpoint"], "--input",
                               data["test"]["path"], "--output", str(tmp_path / "preds")])  # fmt: skip
    assert scored["rows_scored"] + scored["rows_quarantined"] == scored["rows_in"] == data["test"]["rows"]
    assert (tmp_path / "preds" / "_SUCCESS").exists()
