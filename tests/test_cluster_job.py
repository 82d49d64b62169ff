"""A real multi-process, two-node Ray cluster, driven the way users drive one: `ray job submit`.

One cluster serves the module: a head and a second node, each a separate `ray start` with its own
temp dir and ports (two nodes on one machine must not share runtime_resources: each node's
runtime-env agent garbage-collects working_dir packages it thinks are unused). Jobs are submitted
with `--working-dir . --runtime-env cluster/runtime_env.yaml`, exactly as the README shows, and every
run keeps ``train.storage_path`` on S3 (the moto server), since multi-node checkpoints need shared
storage.

Each node offers one ``mmray_slot`` and each trainer worker asks for one, so the two workers of a
``train.num_workers=2`` run must land on different nodes, as one GPU per worker does on a GPU
cluster. Where actors ran is read back from Ray's state API. Processes are stopped by pid (never
`ray stop`, which would kill every Ray on the machine); a `ray start` that loses a port race is retried
with fresh ports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import boto3
import psutil
import pytest

from mmray.config import StorageConfig
from mmray.data import storage
from mmray.score import commit
from tests import faults
from tests.helpers import REPO, free_port, tiny_overrides

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).with_name("ray"))
BUCKET = "mmray-cluster"
SLOT = "mmray_slot"  # one per node, one per trainer worker: two workers can only run on two nodes
JOB_TIMEOUT = 420
START_ATTEMPTS = 3


def _pids(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _stop(marker: str) -> None:
    procs = _pids(marker)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)  # some Ray processes ignore SIGTERM: waiting longer buys nothing
    for p in alive:
        p.kill()


def _start_node(temp_dir: Path, env: dict, head_address: str | None = None) -> dict[str, int]:
    """``ray start`` (head when ``head_address`` is None) with every listening port explicit.

    Other Ray instances on this machine (the test session's own, other users') hold the defaults, and a
    port found free can be taken before Ray binds it: a failed start is cleaned up (by its temp dir)
    and retried with fresh ports.
    """
    for attempt in range(START_ATTEMPTS):
        ports = {
            name: free_port()
            for name in ("gcs", "dashboard", "client", "agent", "metrics", "env_agent", "agent_grpc", "node_manager")
        }
        args = [
            RAY,
            "start",
            f"--temp-dir={temp_dir}",
            "--num-cpus=2",
            f"--resources={json.dumps({SLOT: 1})}",
            f"--dashboard-agent-listen-port={ports['agent']}",
            f"--metrics-export-port={ports['metrics']}",
            f"--runtime-env-agent-port={ports['env_agent']}",
            f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
            f"--node-manager-port={ports['node_manager']}",
            "--disable-usage-stats",
        ]
        if head_address is None:
            args += [
                "--head",
                f"--port={ports['gcs']}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={ports['dashboard']}",
                f"--ray-client-server-port={ports['client']}",
            ]
        else:
            args.append(f"--address={head_address}")
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
        if proc.returncode == 0:
            return ports
        _stop(str(temp_dir))
        if attempt == START_ATTEMPTS - 1:
            raise AssertionError(
                f"ray start failed {START_ATTEMPTS} times:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            )
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def cluster(s3_server):
    # Short and unique: identifies the cluster's processes, and Ray's socket paths must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="mmray-rc-"))
    # The fault trigger of tests.faults, inert while the file is absent. The nodes start with its path:
    # their workers, which run the train.before_step hook, have the environment of `ray start`.
    hold = root / "hold.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MMRAY_DEBUG": "1", faults.ENV_VAR: str(hold)}
    env["PATH"] = (
        f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` on the nodes: this venv's
    )
    # A worker process that has not registered after 60 s is killed and started again; on a loaded 2-core
    # machine Python start-up alone can take that long, and the restarts feed the load.
    env["RAY_worker_register_timeout_seconds"] = "300"
    # The GCS checks each raylet every 1 s instead of 3 (Ray's default) and marks it dead after the same
    # 5 failed checks, each still allowed Ray's 10 s timeout: a killed raylet refuses at once, so the
    # lost node is noticed ~10 s sooner (measured: 42 -> 30 s from the kill to the job's end), while a
    # busy one that answers within 10 s is never counted as failed.
    env["RAY_health_check_period_ms"] = "1000"
    env.pop("RAY_ADDRESS", None)
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    try:
        ports = _start_node(root / "head", env)
        gcs = f"127.0.0.1:{ports['gcs']}"
        _start_node(root / "node2", env, gcs)
        yield {
            "dashboard": f"http://127.0.0.1:{ports['dashboard']}",
            "gcs": gcs,
            "env": env,
            "root": root,
            "hold": hold,
            "s3": s3_server,
            "store": StorageConfig(s3_endpoint_url=s3_server),
        }
    finally:
        _stop(str(root))  # every node: head, node2 and any replacement
        shutil.rmtree(root, ignore_errors=True)


def _submit_args(cluster: dict, submission_id: str, entrypoint: list[str]) -> list[str]:
    """The README's command: `ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- ...`."""
    return [
        RAY,
        "job",
        "submit",
        "--address",
        cluster["dashboard"],
        "--working-dir",
        ".",
        "--runtime-env",
        "cluster/runtime_env.yaml",
        "--submission-id",
        submission_id,
        "--",
        "python",
        *entrypoint,
    ]


def _result(proc: subprocess.CompletedProcess | str) -> dict:
    out = proc if isinstance(proc, str) else proc.stdout
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, out[-3000:]
    return json.loads(lines[-1])


def _submit(cluster: dict, submission_id: str, entrypoint: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _submit_args(cluster, submission_id, entrypoint),
        env=cluster["env"],
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT,
        cwd=REPO,
    )
    assert proc.returncode == 0, f"job {submission_id} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    return proc


def _actor_nodes(cluster: dict, submission_id: str) -> dict[str, list[str]]:
    """Node id of every actor the job created (alive or dead), by actor name, from Ray's state API."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    job_id = JobSubmissionClient(cluster["dashboard"]).get_job_info(submission_id).job_id
    nodes = defaultdict(list)
    for actor in list_actors(
        address=cluster["dashboard"],
        filters=[("job_id", "=", job_id)],
        detail=True,
        limit=10_000,
        raise_on_missing_output=False,
    ):
        nodes[actor.repr_name or actor.class_name].append(actor.node_id)
    return dict(nodes)


def _task_nodes(cluster: dict, submission_id: str, name: str) -> dict[str, int]:
    """How many finished tasks named ``name`` the job ran on each node, from Ray's state API."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_tasks

    job_id = JobSubmissionClient(cluster["dashboard"]).get_job_info(submission_id).job_id
    counts: dict[str, int] = defaultdict(int)
    for task in list_tasks(
        address=cluster["dashboard"],
        filters=[("job_id", "=", job_id), ("name", "=", name)],
        detail=True,
        limit=10_000,
        raise_on_missing_output=False,
    ):
        if task.state == "FINISHED":
            counts[task.node_id] += 1
    return dict(counts)


def _train_args(cluster: dict, data: dict, name: str, **extra: object) -> list[str]:
    overrides = tiny_overrides(
        data,
        f"s3://{BUCKET}/runs",
        **{
            "train.name": name,
            "train.num_workers": 2,
            f"train.resources_per_worker.{SLOT}": 1,
            "storage.s3_endpoint_url": cluster["s3"],
            "data.preprocess.num_cpus": 0.25,
            **extra,
        },
    )
    return ["jobs/train.py", "--config", "configs/demo.yaml", *overrides]


def _history(cluster: dict, name: str) -> list[dict]:
    text = storage.read_text(f"s3://{BUCKET}/runs/{name}/history.jsonl", cluster["store"])
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    from mmray.data.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("cluster_data"), rows=200, seed=3)


@pytest.fixture(scope="module")
def trained(cluster, data, tmp_path_factory) -> dict:
    """One training serves the module (each costs a minute here): two workers on two nodes with
    checkpoints on S3, and the second node's raylet SIGKILLed while rank 0 holds at the start of epoch 1
    (after epoch 0's checkpoint is recorded on S3). ``train.max_failures=1`` restarts the worker group;
    it needs two slots, so it waits until a replacement node joins (on KubeRay or the launcher the
    autoscaler brings one), then resumes from epoch 0's checkpoint and finishes. ``data.cache=never``
    streams the data: blocks cached in the lost node's object store would go with it."""
    name = "lost-node"
    hold = cluster["hold"]
    hold.write_text(json.dumps({"rank": 0, "epoch": 1, "step": 0, "action": "pause", "max_s": JOB_TIMEOUT}))
    args = _submit_args(
        cluster,
        "train-lost-node",
        _train_args(
            cluster,
            data,
            name,
            **{"train.epochs": 2, "train.max_failures": 1, "data.cache": "never", "train.before_step": faults.HOOK},
        ),
    )
    log = tmp_path_factory.mktemp("lost_node") / "lost-node.log"
    with open(log, "w") as out:
        job = subprocess.Popen(args, env=cluster["env"], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            snapshot = f"s3://{BUCKET}/runs/{name}/checkpoint_manager_snapshot.json"
            deadline = time.monotonic() + JOB_TIMEOUT
            while not (
                storage.exists(snapshot, cluster["store"])
                and "checkpoint_epoch0000" in storage.read_text(snapshot, cluster["store"])
            ):
                assert job.poll() is None, f"the job ended early:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no checkpoint was recorded on S3:\n{log.read_text()[-3000:]}"
                time.sleep(0.5)
            (raylet,) = [p for p in _pids(str(cluster["root"] / "node2")) if "raylet" in p.name()]
            raylet.kill()
            _start_node(cluster["root"] / "node3", cluster["env"], cluster["gcs"])  # the replacement
            hold.unlink()
            job.wait(timeout=JOB_TIMEOUT)
        finally:
            if job.poll() is None:
                job.kill()
    text = log.read_text()
    assert job.returncode == 0, text[-4000:]
    return {"name": name, "result": _result(text), "log": text}


@pytest.mark.timeout(2 * JOB_TIMEOUT)  # the first test pays for the module's training
def test_two_trainer_workers_run_on_two_nodes_with_checkpoints_on_s3(cluster, data, trained):
    result = trained["result"]
    assert result["checkpoint"].startswith(f"s3://{BUCKET}/runs/{trained['name']}/checkpoint_epoch")
    assert storage.exists(f"{result['checkpoint']}/model.safetensors", cluster["store"])
    assert result["metrics"]["data"]["train"]["rows_in"] == data["train"]["rows"]
    assert "mmray train: config (non-default keys; --verbose for all) {" in trained["log"]  # logged first
    # One worker per node in each worker group: head + node2, then (node2 lost) head + node3. Each node
    # has one slot, so four workers on three distinct nodes is the only placement that satisfies it.
    workers = _actor_nodes(cluster, "train-lost-node")["RayTrainWorker"]
    assert len(workers) == 4 and len(set(workers)) == 3, workers


def test_losing_a_node_mid_training_resumes_from_the_committed_checkpoint(cluster, trained):
    history = _history(cluster, trained["name"])
    assert [h["epoch"] for h in history] == [0, 1]
    assert [h["resumed_from_epoch"] for h in history] == [None, 0]  # the restart resumed from epoch 0's checkpoint
    assert storage.exists(f"{trained['result']['checkpoint']}/model.safetensors", cluster["store"])


def test_scoring_spreads_actors_over_both_nodes_and_commits_exactly_once(cluster, data, trained):
    out = f"s3://{BUCKET}/preds"
    proc = _submit(
        cluster,
        "score-two-nodes",
        [
            "jobs/score.py",
            "--checkpoint",
            trained["result"]["checkpoint"],
            "--input",
            data["test"]["path"],
            "--output",
            out,
            f"storage.s3_endpoint_url={cluster['s3']}",
            "data.preprocess.concurrency=2",
            "data.preprocess.num_cpus=0.25",
            "score.concurrency=2",
            "score.num_cpus=0.25",
            "score.batch_size=2",  # 30 rows: two actors' worth (pools.MIN_BATCHES_PER_ACTOR batches each)
        ],
    )
    scored = _result(proc)
    assert scored["status"] == "committed"
    assert scored["rows_scored"] + scored["rows_quarantined"] == scored["rows_in"] == data["test"]["rows"]
    nodes = _actor_nodes(cluster, "score-two-nodes")
    pools = {name: ids for name, ids in nodes.items() if "MapWorker" in name}
    # On CPU one pool reads, preprocesses and predicts (score.pools=auto); sized from the 30 rows.
    assert list(pools) == ["MapWorker(MapBatches(SlicePreprocessor))"], nodes
    (ids,) = pools.values()
    assert len(ids) == 2 and len(set(ids)) == 2, f"the scoring pool did not spread: {ids}"
    # Not only placed: each node's actor scored slices of the input (each task is one slice's rows).
    scored_on = _task_nodes(cluster, "score-two-nodes", "MapWorker(MapBatches(SlicePreprocessor)).submit")
    assert set(scored_on) == set(ids) and all(n > 0 for n in scored_on.values()), scored_on
    ids = commit.read_committed(commit.Target(out, {}, cluster["store"]), ["id"]).column("id").to_pylist()
    import pyarrow.dataset as pads

    expected = pads.dataset(data["test"]["path"], format="parquet").to_table(columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == sorted(expected) and len(set(ids)) == len(ids)  # every row exactly once
