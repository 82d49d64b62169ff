"""``mmray tune``: a Ray Tune sweep over the same training run ``mmray train`` launches, split by job:

- ``space``: the search space (dotted config keys, one distribution each), checked against the config
  before any trial starts;
- ``resources``: what one trial holds, and so how many run at once without deadlocking the cluster;
- ``ray_internals``: the one use of Ray's private API (freeing stopped trials' placement groups);
- ``results``: ``results.parquet``, the ranking and the top-trials table;
- ``sweep``: ``run_tune``, which runs them in that order.

Example:
    mmray tune --config configs/demo.yaml --space configs/tune/space.yaml --num-samples 8 \
        data.train=work/data/train data.val=work/data/val train.epochs=4
"""

from mmray.train.tune.ray_internals import release_orphaned_placement_groups
from mmray.train.tune.resources import DRIVER_CPU, concurrency, largest_trial, trial_resources
from mmray.train.tune.results import default_mode, format_top, metric_names, results_table
from mmray.train.tune.space import (
    DISTRIBUTIONS,
    PREPROCESS_KEYS,
    Dimension,
    load_space,
    needs_own_preprocessing,
    parse_space,
    validate_space,
    with_values,
)
from mmray.train.tune.sweep import TuneSettings, fresh_tune_name, run_tune

__all__ = [
    "DISTRIBUTIONS",
    "DRIVER_CPU",
    "Dimension",
    "PREPROCESS_KEYS",
    "TuneSettings",
    "concurrency",
    "default_mode",
    "format_top",
    "fresh_tune_name",
    "largest_trial",
    "load_space",
    "metric_names",
    "needs_own_preprocessing",
    "parse_space",
    "release_orphaned_placement_groups",
    "results_table",
    "run_tune",
    "trial_resources",
    "validate_space",
    "with_values",
]
