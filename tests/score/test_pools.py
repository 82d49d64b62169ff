"""Scoring's pool layout: fused on CPU, split with a GPU predictor, sized down for small inputs, and the
resource check on the configured sizes."""

from __future__ import annotations

import pytest

from mmray.config import ConfigError, load_config
from mmray.score.pools import MIN_BATCHES_PER_ACTOR, plan_pools, pool_size


def test_a_small_input_starts_one_actor_a_large_one_the_configured_pool():
    assert pool_size(4, rows=300, batch_size=128) == 1
    assert pool_size(4, rows=0, batch_size=128) == 1
    assert pool_size(4, rows=MIN_BATCHES_PER_ACTOR * 128 + 1, batch_size=128) == 2
    assert pool_size(4, rows=10**6, batch_size=128) == 4


def test_auto_fuses_on_cpu_and_splits_for_a_gpu_predictor():
    cfg = load_config(None, ["data.preprocess.concurrency=2", "score.concurrency=1", "score.num_cpus=1"])
    cpu = plan_pools(cfg, rows=10**6, num_gpus=0)
    assert (cpu.fused, cpu.readers, cpu.predictors, cpu.reader_cpus) == (True, 3, 0, 1.0)
    gpu = plan_pools(cfg, rows=10**6, num_gpus=1)
    assert (gpu.fused, gpu.readers, gpu.predictors, gpu.reader_cpus) == (False, 2, 1, 0.5)
    forced = plan_pools(load_config(None, ["score.pools=split"]), rows=300, num_gpus=0)
    assert (forced.fused, forced.readers, forced.predictors) == (False, 1, 1)


@pytest.mark.parametrize("pools", ["auto", "split"])
def test_the_resource_check_counts_the_configured_pools_whatever_the_input(pools):
    cfg = load_config(None, [f"score.pools={pools}", "data.preprocess.concurrency=3", "score.concurrency=2"])
    small = plan_pools(cfg, rows=10, num_gpus=0)
    assert small.readers == 1
    held = {d.keys: d.count for d in small.demands(cfg)}
    if pools == "auto":
        assert (
            held["(data.preprocess.concurrency + score.concurrency) x max(data.preprocess.num_cpus, score.num_cpus)"]
            == 5
        )
    else:
        assert held["data.preprocess.concurrency x data.preprocess.num_cpus"] == 3
        assert held["score.concurrency x (score.num_cpus, score.num_gpus)"] == 2


def test_an_unknown_layout_is_a_config_error():
    with pytest.raises(ConfigError, match="score.pools"):
        load_config(None, ["score.pools=both"])
