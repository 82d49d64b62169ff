"""``mmray tune``: a Ray Tune sweep over the same training run ``mmray train`` launches.

Each trial is a Tune *function trainable* that builds the very ``TorchTrainer`` of ``mmray train``
(``launcher.build_trainer``) for its sampled config and calls ``fit()`` in the trial, as Ray Train V2
pairs Train with Tune. Ray Train's ``TuneReportCallback`` forwards every epoch's report to Tune, so
ASHA sees one result per epoch (``training_iteration`` = epochs run) and stops weak trials early;
stopping the trial actor takes its Train controller and workers with it.

The search space is a YAML mapping of dotted config keys to one distribution each::

    train.lr: {loguniform: [1.0e-4, 1.0e-2]}
    model.fusion: {choice: [concat, gated]}
    model.dropout: {uniform: [0.0, 0.3]}
    train.batch_size: {randint: [16, 65]}   # high exclusive, as in ray.tune.randint

Every key is checked against the config before any trial starts: each choice, and both ends of each
range, must give a config the loader accepts, and so must the combinations of those extremes.

Preprocessing (label maps, tokenizer, decoded and tokenized splits) runs once on the driver and is
shared by every trial, unless the space samples a key it depends on (``PREPROCESS_KEYS``); then each
trial preprocesses for itself. Trials never deadlock the cluster: ``max_concurrent_trials`` is what
the cluster holds of one trial's resources (trainer workers x ``train.resources_per_worker``, plus the
preprocessing pool when trials read data, in which case one whole CPU stays free for Ray Data's file
listing).

Output in ``<train.storage_path>/<name>/``: ``results.parquet`` (one row per trial), ``best_config.yaml``
(a full config that ``mmray train --config`` takes unchanged), Tune's experiment state, ``data/``
(the shared tokenizer and quarantine) and ``runs/<trial id>/`` (each trial's Train run).

Example:
    mmray tune --config configs/demo.yaml --space configs/tune/space.yaml --num-samples 8 \
        data.train=work/data/train data.val=work/data/val train.epochs=4
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from mmray.config import Config, ConfigError, config_from_dict, config_to_dict, load_yaml, set_dotted
from mmray.data import storage

__all__ = [
    "DISTRIBUTIONS",
    "Dimension",
    "PREPROCESS_KEYS",
    "TuneSettings",
    "concurrency",
    "default_mode",
    "load_space",
    "needs_own_preprocessing",
    "parse_space",
    "release_orphaned_placement_groups",
    "results_table",
    "run_tune",
    "trial_resources",
    "validate_space",
    "with_values",
]

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
# Keys the sweep owns: each trial's Train run gets its own name under the sweep's directory.
RESERVED = {
    "train.name": "each trial's run is named after its trial id",
    "train.storage_path": "trials run under the sweep's directory",
}
# Sampling one of these keys (or a key under or above one) changes what preprocessing produces.
PREPROCESS_KEYS = (
    "data",
    "storage",
    "model.tasks",
    "model.text_encoder.kind",
    "model.text_encoder.name",
    "model.text_encoder.tokenizer",
    "train.resume_from",
)
DRIVER_CPU = 0.01  # the trial actor only drives Train (TorchTrainer's controller itself asks for 0 CPUs)
MAX_CORNERS = 4096  # combinations of extreme values checked up front
TOP = 5


@dataclass(frozen=True)
class Dimension:
    """One sampled key: ``kind`` is one of ``DISTRIBUTIONS``; ``args`` the choices, or ``(low, high)``."""

    key: str
    kind: str
    args: tuple

    def extremes(self) -> list[Any]:
        """Every value the loader must accept: each choice, or both ends of the range."""
        if self.kind == "choice":
            return list(self.args)
        low, high = self.args
        return [low, high - 1] if self.kind == "randint" else [low, high]

    def domain(self) -> Any:
        import ray.tune

        if self.kind == "choice":
            return ray.tune.choice(list(self.args))
        return getattr(ray.tune, self.kind)(*self.args)


def parse_space(data: Any, source: str = "space") -> list[Dimension]:
    """Dimensions from a mapping ``{dotted.key: {distribution: args}}``; errors name the key.

    Only the shape of each entry is checked here; ``validate_space`` checks the values against a config.
    """
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{source}: expected a non-empty mapping of dotted config keys to distributions")
    dims = []
    for key, spec in data.items():
        if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{source}: {key!r} is not a dotted config key")
        if key in RESERVED:
            raise ConfigError(f"{source}: {key}: cannot be sampled ({RESERVED[key]})")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(
                f"{source}: {key}: expected one of {{{', '.join(f'{d}: ...' for d in DISTRIBUTIONS)}}}, got {spec!r}"
            )
        kind, args = next(iter(spec.items()))
        dims.append(Dimension(key, kind, _parse_args(f"{source}: {key}: {kind}", kind, args)))
    return dims


def _parse_args(where: str, kind: str, args: Any) -> tuple:
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: expected a non-empty list of values, got {args!r}")
        return tuple(args)
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"{where}: expected [low, high], got {args!r}")
    if kind == "randint":
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
            raise ConfigError(f"{where}: expected two integers, got {args!r}")
        low, high = args
    else:
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            low, high = (float(a) for a in args if not isinstance(a, bool))
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected two numbers, got {args!r}") from None
    if not low < high:
        raise ConfigError(f"{where}: low must be < high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: low must be > 0, got {args!r}")
    return (low, high)


def load_space(path: str | Path) -> list[Dimension]:
    return parse_space(load_yaml(path), str(path))


def with_values(base: dict, values: dict[str, Any]) -> Config:
    """The config ``base`` (a ``config_to_dict`` mapping) with each dotted key set to its value."""
    data = json.loads(json.dumps(base))  # a deep copy of plain data
    for key, value in values.items():
        set_dotted(data, key, value)
    return config_from_dict(data)


def validate_space(base: dict, dims: list[Dimension]) -> list[Config]:
    """Checks every key's extreme values, then their combinations; returns the configs checked.

    Raises:
        ConfigError: naming the sampled key (and, for a combination, every key's value).
    """
    for dim in dims:
        for value in dim.extremes():
            try:
                with_values(base, {dim.key: value})
            except ConfigError as e:
                raise ConfigError(f"space {dim.key}: value {value!r} is rejected by the config: {e}") from None
    corners = list(itertools.islice(itertools.product(*(d.extremes() for d in dims)), MAX_CORNERS))
    configs = []
    for corner in corners:
        values = dict(zip((d.key for d in dims), corner))
        try:
            configs.append(with_values(base, values))
        except ConfigError as e:
            raise ConfigError(f"space: the combination {values} is rejected by the config: {e}") from None
    return configs


def needs_own_preprocessing(dims: list[Dimension]) -> bool:
    """Whether a sampled key changes what preprocessing produces (then every trial preprocesses)."""
    return any(
        d.key == p or d.key.startswith(p + ".") or p.startswith(d.key + ".") for d in dims for p in PREPROCESS_KEYS
    )


def trial_resources(cfg: Config, reads_data: bool) -> dict[str, float]:
    """What one trial holds while it trains: its driver, the trainer workers and, when the trial
    reads data (it preprocesses for itself, or the splits stream), the preprocessing pool."""
    from mmray.data.pipeline import preprocess_demand
    from mmray.runtime import total_demand
    from mmray.train.launcher import trainer_demand

    need = total_demand([trainer_demand(cfg), *([preprocess_demand(cfg.data.preprocess)] if reads_data else [])])
    need["CPU"] = need.get("CPU", 0.0) + DRIVER_CPU
    return need


def concurrency(cluster: dict[str, float], need: dict[str, float], reads_data: bool) -> int:
    """How many trials the cluster runs at once without any of them waiting forever.

    Raises:
        ValueError: when not even one trial fits, naming the resource.
    """
    fits = []
    for resource, amount in sorted(need.items()):
        have = cluster.get(resource, 0.0)
        spare = have - (1.0 if resource == "CPU" and reads_data else 0.0)
        n = math.floor(spare / amount + 1e-9)
        if n < 1:
            why = " with one whole CPU left for Ray Data's file listing" if resource == "CPU" and reads_data else ""
            raise ValueError(
                f"one trial needs {amount:g} {resource} (train.num_workers x train.resources_per_worker"
                f"{', + the data.preprocess pool' if reads_data else ''}) but the cluster has "
                f"{have:g}{why}"
            )
        fits.append(n)
    return min(fits)


def default_mode(metric: str) -> str:
    """Losses and errors are minimised, everything else (accuracy, F1, AUROC) maximised."""
    return "min" if metric.endswith(("loss", "mae", "rmse")) else "max"


def metric_names(tasks: list) -> list[str]:
    """The metrics each epoch reports for these tasks (what the loop's ``epoch_record`` carries)."""
    from mmray.metrics import MetricAccumulator

    return ["train_loss", *sorted(f"val_{k}" for k in MetricAccumulator(tasks).compute())]


@dataclass(frozen=True)
class TuneSettings:
    num_samples: int = 8
    metric: str = "val_loss"
    mode: str | None = None  # None: default_mode(metric)
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: float = 2.0  # ASHA keeps the best 1/reduction_factor at each rung
    max_concurrent: int | None = None  # None: as many as the cluster holds
    name: str | None = None  # None: a fresh mmray-tune-<time>-<hex>


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


def _trial(values: dict[str, Any], *, base: dict, prepared: Any, runs: str) -> None:
    """One trial: the ``mmray train`` trainer for the sampled config, its epochs forwarded to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mmray.train import launcher

    cfg = with_values(base, values)
    trial_id = ray.tune.get_context().get_trial_id()
    if prepared is None:
        prepared = launcher.prepare(cfg, storage.join(runs, trial_id))
    launcher.build_trainer(cfg, prepared, runs, trial_id, callbacks=(TuneReportCallback(),)).fit()


def release_orphaned_placement_groups() -> int:
    """Removes this job's placement groups whose creating actor has died; returns how many.

    When ASHA stops a trial, Tune kills the trial actor and with it the Train controller it owns,
    before the controller can remove its worker group's placement group. Ray Train's detached
    ``PlacementGroupCleaner`` frees it only through the State API, which a Ray without dashboard
    (the embedded one, the tests') does not serve, and the GCS frees it only when the job ends; until
    then the next trials wait for resources that never come back. Such a group is useless to anyone:
    only its creator held it. No public API names a placement group's creator, hence the GCS table.
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    released = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        orphan = (
            pg.state != gcs_pb2.PlacementGroupTableData.REMOVED
            and not pg.is_detached
            and pg.creator_actor_dead
            and not ray.ActorID(pg.creator_actor_id).is_nil()  # a driver's own groups count as actor-dead
            and pg.creator_job_id.hex() == job
        )
        if orphan:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            released += 1
    return released


def _janitor(interval_s: float = 2.0) -> Any:
    """A Tune callback that runs ``release_orphaned_placement_groups`` at most every ``interval_s``."""
    import time

    import ray.tune

    class Janitor(ray.tune.Callback):
        last = 0.0

        def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
            if time.monotonic() - self.last >= interval_s:
                self.last = time.monotonic()
                released = release_orphaned_placement_groups()
                if released:
                    print(f"mmray tune: released {released} placement group(s) of stopped trials", flush=True)

    return Janitor()


def _history(result: Any) -> list[dict[str, Any]]:
    df = result.metrics_dataframe
    return [] if df is None else df.to_dict("records")


def _rows(grid: Any, dims: list[Dimension], metric: str, mode: str, base: dict, runs: str, root: str) -> list[dict]:
    from mmray.runs import result_uri

    best = min if mode == "min" else max
    rows = []
    for result in grid:
        history = [h for h in _history(result) if _number(h.get(metric))]
        config = result.metrics.get("config") or {}
        trial_id = result.metrics.get("trial_id")
        epochs = with_values(base, {d.key: config[d.key] for d in dims if d.key in config}).train.epochs
        values = [float(h[metric]) for h in history]
        at_best = history[values.index(best(values))] if values else {}
        status = "error" if result.error else ("completed" if len(history) >= epochs else "stopped_early")
        rows.append(
            {
                "trial_id": trial_id,
                **{d.key: config.get(d.key) for d in dims},
                "status": status,
                "epochs": len(history),
                "final_metric": values[-1] if values else None,
                "best_metric": at_best.get(metric),
                "best_epoch": at_best.get("epoch"),
                "metric_history": values,
                "run_dir": storage.join(runs, trial_id) if trial_id else None,
                "checkpoint": result_uri(at_best["checkpoint_path"], root) if at_best.get("checkpoint_path") else None,
                "error": storage.redact(str(result.error)) if result.error else None,
            }
        )
    return sorted(rows, key=lambda r: str(r["trial_id"]))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def results_table(rows: list[dict], dims: list[Dimension], metric: str, mode: str) -> pa.Table:
    """One row per trial. A sampled key's column keeps its values' type; choices that mix types
    (``[true, 2]``, ``[null, 1.0]`` with strings ...) are stored as their JSON text instead."""
    columns = {}
    for name in rows[0] if rows else ["trial_id"]:
        values = [r.get(name) for r in rows]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[name] = pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
    meta = {"mmray.metric": metric, "mmray.mode": mode, "mmray.space": json.dumps([d.key for d in dims])}
    return pa.table(columns).replace_schema_metadata(meta)


def _rank(rows: list[dict], mode: str) -> list[dict]:
    scored = [r for r in rows if _number(r["best_metric"])]
    return sorted(scored, key=lambda r: r["best_metric"], reverse=mode == "max")


def format_top(rows: list[dict], dims: list[Dimension], metric: str, mode: str, k: int = TOP) -> str:
    """The best ``k`` trials as an aligned text table."""
    header = ["trial_id", f"best {metric}", "epochs", "status", *(d.key for d in dims)]
    body = [
        [
            str(r["trial_id"]),
            f"{r['best_metric']:.4f}",
            str(r["epochs"]),
            r["status"],
            *(_short(r[d.key]) for d in dims),
        ]
        for r in _rank(rows, mode)[:k]
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = [f"top {min(k, len(body))} of {len(rows)} trials by {metric} ({mode}):"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *body]]
    return "\n".join(lines)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _write_table(table: pa.Table, uri: str, cfg: Config) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes(), cfg.storage)


def fresh_tune_name() -> str:
    return f"mmray-tune-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def run_tune(cfg: Config, dims: list[Dimension], settings: TuneSettings, address: str | None = None) -> dict[str, Any]:
    """Runs the sweep, starting or joining Ray (``address``) once the space is valid. Returns ``results``, ``best_config``,
    ``best_metric`` (and the metric, mode, best trial and its checkpoint, the trial count).

    Raises:
        ConfigError: a sampled key or value the config rejects (before any trial starts).
        ValueError: bad settings, an unknown metric, or a trial that cannot fit on the cluster.
    """
    import ray
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    from mmray.runs import storage_root
    from mmray.runtime import init_ray
    from mmray.train import launcher

    mode = _check_settings(settings)
    base = config_to_dict(cfg)
    checked = validate_space(base, dims)
    init_ray(address)
    own_prep = needs_own_preprocessing(dims)
    name = settings.name or fresh_tune_name()
    root = storage_root(cfg)
    sweep = storage.join(root, name)
    results_uri = storage.join(sweep, "results.parquet")
    if storage.exists(results_uri, cfg.storage):
        raise ValueError(f"--name {name}: {storage.redact(results_uri)} exists already; choose another name")
    runs = storage.join(sweep, "runs")

    prepared = None
    if not own_prep:
        prepared = launcher.prepare(cfg, storage.join(sweep, "data"))
        known = metric_names(prepared.tasks)
        if settings.metric not in known:
            raise ValueError(f"--metric: {settings.metric!r} is not reported by this config (known: {known})")
    reads_data = own_prep or not prepared.cached
    need: dict[str, float] = {}
    for c in checked:  # the largest trial the space can draw
        for k, v in trial_resources(c, reads_data).items():
            need[k] = max(need.get(k, 0.0), v)
    fits = concurrency(ray.cluster_resources(), need, reads_data)
    limit = settings.max_concurrent or fits
    max_epochs = max(c.train.epochs for c in checked)
    print(
        f"mmray tune: {name}: {settings.num_samples} trials, {limit} at a time (one needs {need}; the cluster "
        f"holds {fits}), ASHA on {settings.metric} ({mode}) over <= {max_epochs} epochs, grace "
        f"{settings.grace_period}, reduction factor {settings.reduction_factor:g}; preprocessing "
        f"{'per trial' if own_prep else 'shared'}",
        flush=True,
    )

    fs, tune_storage = storage.resolve(root, cfg.storage) if storage.is_s3(root) else (None, root)
    # Trials run where the driver's relative paths still mean what they did (Tune would chdir).
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    trainable = ray.tune.with_parameters(_trial, base=base, prepared=prepared, runs=runs)
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(trainable, {"CPU": DRIVER_CPU}),
        param_space={d.key: d.domain() for d in dims},
        tune_config=ray.tune.TuneConfig(
            metric=settings.metric,
            mode=mode,
            num_samples=settings.num_samples,
            max_concurrent_trials=limit,
            # stop_last_trials=False: a trial that reaches max_t ends on its own, so its Train run
            # shuts down cleanly instead of being killed at the finish line.
            scheduler=ASHAScheduler(
                time_attr="training_iteration",
                max_t=max_epochs,
                grace_period=min(settings.grace_period, max_epochs),
                reduction_factor=settings.reduction_factor,
                stop_last_trials=False,
            ),
        ),
        run_config=ray.tune.RunConfig(
            name=name, storage_path=tune_storage, storage_filesystem=fs, verbose=1, callbacks=[_janitor()]
        ),
    )
    grid = tuner.fit()
    release_orphaned_placement_groups()

    rows = _rows(grid, dims, settings.metric, mode, base, runs, root)
    _write_table(results_table(rows, dims, settings.metric, mode), results_uri, cfg)
    ranked = _rank(rows, mode)
    print(format_top(rows, dims, settings.metric, mode), flush=True)
    out: dict[str, Any] = {"results": results_uri, "trials": len(rows), "metric": settings.metric, "mode": mode}
    if not ranked:
        errors = sorted({r["error"] for r in rows if r["error"]})
        raise ValueError(
            f"no trial reported {settings.metric!r} ({len(rows)} trials, results in "
            f"{storage.redact(results_uri)}); first error: {errors[0] if errors else 'none'}"
        )
    best = ranked[0]
    best_cfg = with_values(base, {d.key: best[d.key] for d in dims})
    best_uri = storage.join(sweep, "best_config.yaml")
    header = (
        f"# mmray tune {name}: best of {len(rows)} trials by {settings.metric} ({mode}) = "
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
