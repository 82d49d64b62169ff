"""The resource budget check: a job that would hold more than the cluster has fails at once, naming
the config keys, instead of waiting forever (no Ray needed: the cluster's figures are given)."""

from __future__ import annotations

import pytest

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
