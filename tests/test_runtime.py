"""The resource budget check: a job that would hold more than the cluster has fails at once, naming
the config keys, instead of waiting forever (no Ray needed: the cluster's figures are given)."""

from __future__ import annotations

import pytest
from ray.data.exceptions import ExecutionTimeoutError

from mmray import runtime
from mmray.config import config_from_dict
from mmray.data.pipeline import preprocess_demand
from mmray.runtime import READ_TASKS, Demand, ResourceBudgetError, check_resources
from mmray.train.launcher import trainer_demand


@pytest.fixture
def cluster(monkeypatch):
    """Sets what the 'cluster' has: ``cluster(total, largest_node=None, autoscaler=False)``."""

    def set_cluster(total: dict, largest: dict | None = None, autoscaler: bool = False) -> None:
        source = "its autoscaler's maximum" if autoscaler else "ray.cluster_resources()"
        monkeypatch.setattr(runtime, "cluster_capacity", lambda: (total, source))
        monkeypatch.setattr(runtime, "_largest_node", lambda: largest if largest is not None else total)

    return set_cluster


def test_a_job_that_fits_exactly_passes(cluster):
    cluster({"CPU": 2.0})
    cfg = config_from_dict({"train": {"num_workers": 2, "resources_per_worker": {"CPU": 0.5}}})
    check_resources("mmray train", [trainer_demand(cfg), READ_TASKS])  # 1 + 1 = 2


def test_over_subscribed_cpus_fail_naming_every_key_and_the_figures(cluster):
    cluster({"CPU": 2.0})
    cfg = config_from_dict(
        {
            "data": {"preprocess": {"concurrency": 1, "num_cpus": 0.5}},
            "train": {"num_workers": 2, "resources_per_worker": {"CPU": 0.5}},
        }
    )
    with pytest.raises(ResourceBudgetError) as e:
        check_resources("mmray train", [trainer_demand(cfg), preprocess_demand(cfg.data.preprocess), READ_TASKS])
    msg = str(e.value)
    assert msg.startswith("mmray train would wait forever: it holds 2.5 CPU at once")
    assert "train.num_workers x train.resources_per_worker: 2 x 0.5" in msg
    assert "data.preprocess.concurrency x data.preprocess.num_cpus: 1 x 0.5" in msg
    assert "1 whole CPU" in msg and "the cluster has 2 CPU (ray.cluster_resources())" in msg


def test_gpus_are_counted_per_worker_and_missing_gpus_fail(cluster):
    cluster({"CPU": 16.0})
    cfg = config_from_dict({"train": {"num_workers": 2, "use_gpu": True, "resources_per_worker": {"CPU": 1}}})
    assert trainer_demand(cfg).per_unit == {"CPU": 1.0, "GPU": 1.0}
    with pytest.raises(ResourceBudgetError, match=r"holds 2 GPU at once .* has 0 GPU"):
        check_resources("mmray train", [trainer_demand(cfg), READ_TASKS])


def test_one_unit_larger_than_any_node_fails_even_when_the_total_fits(cluster):
    cluster({"CPU": 8.0}, largest={"CPU": 2.0})
    big = Demand("train.num_workers x train.resources_per_worker", 2, {"CPU": 3.0})
    with pytest.raises(ResourceBudgetError, match=r"asks for 3 CPU in one process, but the largest node has 2 CPU"):
        check_resources("mmray train", [big, READ_TASKS])


def test_an_autoscaler_maximum_is_the_capacity_and_nodes_not_up_yet_do_not_count(cluster):
    cluster({"CPU": 64.0}, largest={}, autoscaler=True)  # a head with num-cpus 0 and no worker up yet
    check_resources(
        "mmray score", [Demand("score.concurrency x (score.num_cpus, score.num_gpus)", 8, {"CPU": 4}), READ_TASKS]
    )
    with pytest.raises(ResourceBudgetError, match=r"has 64 CPU \(its autoscaler's maximum\)"):
        check_resources(
            "mmray score", [Demand("score.concurrency x (score.num_cpus, score.num_gpus)", 16, {"CPU": 4}), READ_TASKS]
        )


# cluster_capacity and _largest_node themselves, with Ray's side replaced (its autoscaler config reader,
# its resource and node tables), not mmray's: the branch that reads the autoscaler's limits runs.


@pytest.fixture
def ray_reports(monkeypatch):
    """Sets what Ray reports: ``ray_reports(autoscaler=..., resources=..., nodes=...)``; ``autoscaler``
    may be an exception, raised as a moved private API would."""
    from ray._private.state import state

    def set_reports(autoscaler=None, resources=None, nodes=()):
        def limits():
            if isinstance(autoscaler, Exception):
                raise autoscaler
            return autoscaler

        monkeypatch.setattr(state, "get_max_resources_from_cluster_config", limits)
        monkeypatch.setattr(runtime.ray, "cluster_resources", lambda: dict(resources or {}))
        monkeypatch.setattr(runtime.ray, "nodes", lambda: list(nodes))

    return set_reports


def test_the_autoscalers_maximum_from_rays_cluster_config_is_the_capacity(ray_reports):
    ray_reports(autoscaler={"CPU": 64, "GPU": 8}, resources={"CPU": 2.0})
    assert runtime.cluster_capacity() == ({"CPU": 64.0, "GPU": 8.0}, "its autoscaler's maximum")
    demand = Demand("score.concurrency x (score.num_cpus, score.num_gpus)", 16, {"CPU": 4})
    with pytest.raises(ResourceBudgetError, match=r"holds 65 CPU at once .* has 64 CPU \(its autoscaler's maximum\)"):
        check_resources("mmray score", [demand, READ_TASKS])


@pytest.mark.parametrize("autoscaler", [None, {}, AttributeError("moved in a later Ray")])
def test_without_an_autoscaler_or_when_its_api_moved_the_nodes_there_now_count(ray_reports, autoscaler):
    nodes = [
        {"Alive": True, "Resources": {"CPU": 2.0}},
        {"Alive": True, "Resources": {"CPU": 4.0, "GPU": 1.0}},
        {"Alive": False, "Resources": {"CPU": 64.0}},  # a dead node is no capacity
    ]
    ray_reports(autoscaler=autoscaler, resources={"CPU": 6.0, "GPU": 1.0}, nodes=nodes)
    assert runtime.cluster_capacity() == ({"CPU": 6.0, "GPU": 1.0}, "ray.cluster_resources()")
    assert runtime._largest_node() == {"CPU": 4.0, "GPU": 1.0}
    with pytest.raises(ResourceBudgetError, match=r"asks for 5 CPU in one process, but the largest node has 4 CPU"):
        check_resources("mmray train", [Demand("train.num_workers x train.resources_per_worker", 1, {"CPU": 5})])


# The no-progress watchdog: Ray's error, wherever a job meets it, becomes one StallError (no Ray needed).

RAY_SUMMARY = (
    "Dataset execution made no progress for at least 5s of scheduling time (timeout: 5s).\n"
    "Operators still running:\n  - ReadFiles: 1 active task(s), 0 finished, 0 outputs taken\n"
    "If this is expected, raise the timeout with `ds.context.execution_no_progress_timeout_s = <seconds>`"
)


def a_trainer_worker_stalled() -> Exception:
    """What ``TorchTrainer.fit`` raises when a worker's shard timed out in the split coordinator."""
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    in_worker = RayTaskError("SplitCoordinator.get", "Traceback ...", ExecutionTimeoutError(RAY_SUMMARY))
    return WorkerGroupError("Training failed: worker 0 raised", {0: in_worker})


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(lambda: ExecutionTimeoutError(RAY_SUMMARY)),
        pytest.param(a_trainer_worker_stalled),
    ],
    ids=["driver", "trainer worker"],
)
def test_a_no_progress_timeout_becomes_a_stall_error_with_rays_summary_and_the_key(error):
    with pytest.raises(runtime.StallError) as raised, runtime.failing_on_stall("mmray train", 5):
        raise error()
    message = str(raised.value)
    assert message.startswith(
        "mmray train was stopped: its data stream made no progress for 5 s (data.stall_timeout_s)"
    )
    assert "ReadFiles: 1 active task(s), 0 finished" in message and "Traceback" not in message
    assert "ds.context" not in message  # Ray's advice names its own knob; ours names the config key
    assert "raise data.stall_timeout_s (now 5), or set data.stall_timeout_s=0" in message


def test_other_failures_pass_through_the_stall_guard_unchanged():
    with pytest.raises(KeyError, match="label"), runtime.failing_on_stall("mmray score", 5):
        raise KeyError("label")


def test_an_actor_runs_on_the_gpu_ray_gave_it_or_on_the_cpu():
    assert [runtime.actor_device(n) for n in (0, 0.0, 0.5, 1)] == ["cpu", "cpu", "cuda", "cuda"]
