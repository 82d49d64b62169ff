"""``mmray tune``'s run: check the space and settings, size the concurrency, run Tune, report.

Each trial is a Tune *function trainable* that builds the very ``TorchTrainer`` of ``mmray train``
(``launcher.build_trainer``) for its sampled config and calls ``fit()`` in the trial, as Ray Train V2
pairs Train with Tune. Ray Train's ``TuneReportCallback`` forwards every epoch's report to Tune, so
ASHA sees one result per epoch (``training_iteration`` = epochs run) and stops weak trials early;
stopping the trial actor takes its Train controller and workers with it. The trials' values are drawn
from ``train.seed``: the same config and space file sample the same trials.

Preprocessing (label maps, tokenizer, decoded and tokenized splits) runs once on the driver and is
shared by every trial, unless the space samples a key it depends on (``space.PREPROCESS_KEYS``); then
each trial preprocesses for itself.

Output in ``<train.storage_path>/<name>/``: ``results.parquet`` (one row per trial), ``best_config.yaml``
(a full config that ``mmray train --config`` takes unchanged), Tune's experiment state, ``data/``
(the shared tokenizer and quarantine) and ``runs/<trial id>/`` (each trial's Train run).

Example:
    mmray tune --config configs/demo.yaml --space configs/tune/space.yaml --num-samples 8 \
        data.train=work/data/train data.val=work/data/val train.epochs=4
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from mmray.config import Config, config_to_dict
from mmray.console import say, show
from mmray.data import storage
from mmray.train.tune.ray_internals import janitor, release_orphaned_placement_groups
from mmray.train.tune.resources import DRIVER_CPU, concurrency, largest_trial
from mmray.train.tune.results import default_mode, format_top, metric_names, rank, trial_rows, write_results
from mmray.train.tune.space import Dimension, needs_own_preprocessing, validate_space, with_values

__all__ = ["TuneSettings", "fresh_tune_name", "run_tune"]


@dataclass(frozen=True)
class TuneSettings:
    """The sweep's own settings (``mmray tune`` flags); the trials' settings are the config's."""

    num_samples: int = 8
    metric: str = "val_loss"
    mode: str | None = None  # None: default_mode(metric)
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: float = 2.0  # ASHA keeps the best 1/reduction_factor at each rung
    max_concurrent: int | None = None  # None: as many as the cluster holds
    name: str | None = None  # None: a fresh mmray-tune-<time>-<hex>


@dataclass(frozen=True)
class _Sweep:
    """Where one sweep's files go (URIs, local or s3://)."""

    name: str
    root: str  # train.storage_path: Tune's storage
    dir: str  # <root>/<name>
    results: str  # results.parquet: its presence means the name is taken
    runs: str  # each trial's Train run, under its trial id


def _check_settings(s: TuneSettings) -> str:
    if s.num_samples < 1:
        raise ValueError(f"--num-samples: must be >= 1, got {s.num_samples}")
    if s.grace_period < 1:
        raise ValueError(f"--grace-period: must be >= 1, got {s.grace_period}")
    if s.reduction_factor <= 1:
        raise ValueError(f"--reduction-factor: must be > 1, got {s.reduction_factor}")
    if s.max_concurrent is not None and s.max_concurrent < 1:
        raise ValueError(f"--max-concurrent: must be >= 1, got {s.max_concurrent}")
    mode = s.mode or default_mode(s.metric)
    if mode not in ("min", "max"):
        raise ValueError(f"--mode: must be min or max, got {mode!r}")
    return mode


def fresh_tune_name() -> str:
    return f"mmray-tune-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def _locate(cfg: Config, name: str | None) -> _Sweep:
    """The sweep's directory; a name whose results exist is refused before any trial runs."""
    from mmray.runs import storage_root

    name = name or fresh_tune_name()
    root = storage_root(cfg)
    sweep = storage.join(root, name)
    results = storage.join(sweep, "results.parquet")
    if storage.exists(results, cfg.storage):
        raise ValueError(f"--name {name}: {storage.redact(results)} exists already; choose another name")
    return _Sweep(name, root, sweep, results, storage.join(sweep, "runs"))


def _shared_preprocessing(cfg: Config, sweep: _Sweep, metric: str) -> Any:
    """Preprocesses once for every trial, and checks the metric against the tasks it found."""
    from mmray.train import launcher

    prepared = launcher.prepare(cfg, storage.join(sweep.dir, "data"))
    known = metric_names(prepared.tasks)
    if metric not in known:
        raise ValueError(f"--metric: {metric!r} is not reported by this config (known: {known})")
    return prepared


def _trial(values: dict[str, Any], *, base: dict, prepared: Any, runs: str) -> None:
    """One trial: the ``mmray train`` trainer for the sampled config, its epochs forwarded to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mmray.train import launcher

    cfg = with_values(base, values)
    trial_id = ray.tune.get_context().get_trial_id()
    if prepared is None:
        launcher.preflight(cfg)
        prepared = launcher.prepare(cfg, storage.join(runs, trial_id))
    launcher.build_trainer(cfg, prepared, runs, trial_id, callbacks=(TuneReportCallback(),)).fit()


@contextlib.contextmanager
def _keep_driver_cwd() -> Iterator[None]:
    """Trials run where the driver's relative paths still mean what they did: Tune chdirs each trial
    actor into its trial directory unless ``RAY_CHDIR_TO_TRIAL_DIR=0``, which Tune (Ray 2.60) copies
    from the driver's environment into the trial actors' runtime env as it starts them. Set only while
    the sweep runs, then restored, so nothing else this process does or starts sees it."""
    before = os.environ.get("RAY_CHDIR_TO_TRIAL_DIR")
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_CHDIR_TO_TRIAL_DIR", None)
        else:
            os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = before


def _tune_config(settings: TuneSettings, mode: str, limit: int, max_epochs: int, seed: int) -> Any:
    """ASHA over epochs (``training_iteration``), at most ``limit`` trials at a time, their values drawn
    from ``seed`` (``train.seed``) in the space's key order: the same config and space file sample the
    same trials in the same order."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    return ray.tune.TuneConfig(
        metric=settings.metric,
        mode=mode,
        num_samples=settings.num_samples,
        # Tune's own random search, seeded. The limit is its max_concurrent: Tune (Ray 2.60) ignores
        # max_concurrent_trials, with a warning, once a search algorithm is given.
        search_alg=BasicVariantGenerator(max_concurrent=limit, random_state=seed),
        # stop_last_trials=False: a trial that reaches max_t ends on its own, so its Train run
        # shuts down cleanly instead of being killed at the finish line.
        scheduler=ASHAScheduler(
            time_attr="training_iteration",
            max_t=max_epochs,
            grace_period=min(settings.grace_period, max_epochs),
            reduction_factor=settings.reduction_factor,
            stop_last_trials=False,
        ),
    )


def _param_space(dims: list[Dimension]) -> dict[str, Any]:
    """Tune's ``param_space``: each sampled key's Tune distribution."""
    return {d.key: d.domain() for d in dims}


def _fit(cfg: Config, dims: list[Dimension], sweep: _Sweep, trainable: Any, tune_config: Any) -> Any:
    """Runs the trials; then frees what stopped trials left behind (``ray_internals``)."""
    import ray.tune

    fs, tune_storage = storage.resolve(sweep.root, cfg.storage) if storage.is_s3(sweep.root) else (None, sweep.root)
    with _keep_driver_cwd():
        tuner = ray.tune.Tuner(
            ray.tune.with_resources(trainable, {"CPU": DRIVER_CPU}),
            param_space=_param_space(dims),
            tune_config=tune_config,
            run_config=ray.tune.RunConfig(
                name=sweep.name, storage_path=tune_storage, storage_filesystem=fs, verbose=1, callbacks=[janitor()]
            ),
        )
        grid = tuner.fit()
    release_orphaned_placement_groups()
    return grid


def _report(
    grid: Any, cfg: Config, dims: list[Dimension], settings: TuneSettings, mode: str, sweep: _Sweep
) -> dict[str, Any]:
    """Writes ``results.parquet``, shows the top trials and writes the best trial's full config.

    Raises:
        ValueError: no trial reported the metric (the results are written first).
    """
    base = config_to_dict(cfg)
    rows = trial_rows(grid, dims, settings.metric, mode, base, sweep.runs, sweep.root)
    write_results(rows, dims, settings.metric, mode, sweep.results, cfg)
    ranked = rank(rows, mode)
    show(format_top(rows, dims, settings.metric, mode))
    out: dict[str, Any] = {"results": sweep.results, "trials": len(rows), "metric": settings.metric, "mode": mode}
    if not ranked:
        errors = sorted({r["error"] for r in rows if r["error"]})
        raise ValueError(
            f"no trial reported {settings.metric!r} ({len(rows)} trials, results in "
            f"{storage.redact(sweep.results)}); first error: {errors[0] if errors else 'none'}"
        )
    best = ranked[0]
    best_cfg = with_values(base, {d.key: best[d.key] for d in dims})
    best_uri = storage.join(sweep.dir, "best_config.yaml")
    header = (
        f"# mmray tune {sweep.name}: best of {len(rows)} trials by {settings.metric} ({mode}) = "
        f"{best['best_metric']:.6g}, trial {best['trial_id']}\n"
    )
    storage.write_text(best_uri, header + yaml.safe_dump(config_to_dict(best_cfg), sort_keys=False), cfg.storage)
    out.update(
        best_config=best_uri,
        best_metric=best["best_metric"],
        best_trial=best["trial_id"],
        best_checkpoint=storage.redact(best["checkpoint"]) if best["checkpoint"] else None,
    )
    return out


def run_tune(cfg: Config, dims: list[Dimension], settings: TuneSettings, address: str | None = None) -> dict[str, Any]:
    """Runs the sweep, starting or joining Ray (``address``) once the space is valid. Returns ``results``, ``best_config``,
    ``best_metric`` (and the metric, mode, best trial and its checkpoint, the trial count).

    Raises:
        ConfigError: a sampled key or value the config rejects (before any trial starts).
        ValueError: bad settings, an unknown metric, or a trial that cannot fit on the cluster.
    """
    import ray
    import ray.tune

    from mmray.runtime import init_ray
    from mmray.train import launcher

    mode = _check_settings(settings)
    base = config_to_dict(cfg)
    checked = validate_space(base, dims)
    launcher.preflight(cfg)  # a bad checkpoint, hook or tracker fails here, before Ray starts
    init_ray(address)
    # Cached features are those of the base config's encoders (built from its seed): a trial that samples
    # a model or train key might build others, so each trial encodes its own.
    own_prep = needs_own_preprocessing(dims) or cfg.data.cache == "features"
    sweep = _locate(cfg, settings.name)
    prepared = None if own_prep else _shared_preprocessing(cfg, sweep, settings.metric)
    reads_data = own_prep or not prepared.cached
    need = largest_trial(checked, reads_data)  # the largest trial the space can draw
    fits = concurrency(ray.cluster_resources(), need, reads_data)
    limit = settings.max_concurrent or fits
    max_epochs = max(c.train.epochs for c in checked)
    say(
        f"{sweep.name}: {settings.num_samples} trials, {limit} at a time (one needs {need}; the cluster "
        f"holds {fits}), ASHA on {settings.metric} ({mode}) over <= {max_epochs} epochs, grace "
        f"{settings.grace_period}, reduction factor {settings.reduction_factor:g}; preprocessing "
        f"{'per trial' if own_prep else 'shared'}",
        "tune",
    )
    trainable = ray.tune.with_parameters(_trial, base=base, prepared=prepared, runs=sweep.runs)
    grid = _fit(cfg, dims, sweep, trainable, _tune_config(settings, mode, limit, max_epochs, cfg.train.seed))
    return _report(grid, cfg, dims, settings, mode, sweep)
