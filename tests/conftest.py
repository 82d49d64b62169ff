"""Shared fixtures: one Ray instance per session, synthetic data, a real S3 API server, the real CLI.

Ray starts once (``ray_session``); CLI tests run ``mmray`` as a subprocess that joins that same
instance through ``RAY_ADDRESS`` instead of paying for a new one each time.
"""

from __future__ import annotations

import os
import random
import tempfile
import uuid

import numpy as np
import pytest
import torch
from hypothesis import settings

from tests.faults import ENV_VAR
from tests.helpers import FAKE_SECRET

# Before Ray starts: workers inherit this environment.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")  # the workers too: nothing is downloaded, ever
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray Train's controller polls its workers every 2 s by default, so every run waits up to one poll to see
# each report and another to see the end; the suite's ~30 tiny runs poll 4x as often instead.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# The trigger file of tests.faults (the train.before_step hook the fault tests install): one per session.
os.environ[ENV_VAR] = os.path.join(tempfile.gettempdir(), f"mmray-fault-{uuid.uuid4().hex[:12]}.json")
# Fake credentials for the local S3 API server (never a real AWS account).
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
# A unique secret, set before the session's Ray starts, so that Ray workers and every CLI run hold it
# too: tests/test_s3_e2e.py scans what they wrote (objects, stdout, Ray's session logs) for it.
os.environ["AWS_SECRET_ACCESS_KEY"] = FAKE_SECRET
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.pop("AWS_PROFILE", None)

# Every run replays the same examples, a developer's `make test` as much as CI's: a red test is red
# again on the next run, never a new random draw (derandomize=True also turns the example database
# off, so nothing a previous run saved changes what runs). HYPOTHESIS_PROFILE=explore draws new examples
# on purpose, to hunt for failures the fixed ones miss.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") == "true" else "dev"))


def pytest_collection_modifyitems(config, items):
    """End-to-end files first, each file's tests kept together and in order: ``make test`` hands whole
    files to two workers in this order, so the minute-long files start early instead of ending the run on
    one worker while the other idles (longest first)."""
    first = {item.path for item in items if item.get_closest_marker("integration")}
    items.sort(key=lambda item: item.path not in first)  # stable: the order within each group stays


@pytest.fixture
def seed() -> int:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (2 CPUs, like this machine and CI)."""
    import ray

    # Ray waits a hard-coded 30 s for its raylet; on a loaded 2-core machine that can run out, so retry.
    for attempt in range(3):
        if ray.is_initialized():
            break
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_session) -> str:
    return ray_session.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict:
    """A small synthetic dataset (train/val/test folders), made once per session."""
    from mmray.data.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("demo_data"), rows=800, seed=0)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto) on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # the OS picks a free port
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the local S3 server; yields its name."""
    import boto3

    name = f"mmray-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name
