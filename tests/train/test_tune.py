"""``mmray tune``: the search space (parsed and checked against the config without Ray), resource
budgeting, the results table, and one real 4-trial ASHA sweep through the CLI on the session's Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from mmray.config import ConfigError, config_from_dict, config_to_dict, load_config
from mmray.data.labels import task_from_dict
from mmray.train import tune
from mmray.train.tune import Dimension, concurrency, parse_space, trial_resources, validate_space, with_values
from tests.helpers import REPO, run_cli, run_cli_here

DEMO = config_to_dict(load_config(REPO / "configs/demo.yaml"))


def test_space_parses_every_distribution():
    dims = parse_space(
        {
            "train.lr": {"loguniform": ["1e-4", 1.0e-2]},  # YAML 1.1 reads 1e-4 as a string
            "model.fusion": {"choice": ["concat", "gated"]},
            "model.dropout": {"uniform": [0, 0.3]},
            "train.batch_size": {"randint": [16, 65]},
        }
    )
    assert dims == [
        Dimension("train.lr", "loguniform", (1e-4, 1e-2)),
        Dimension("model.fusion", "choice", ("concat", "gated")),
        Dimension("model.dropout", "uniform", (0.0, 0.3)),
        Dimension("train.batch_size", "randint", (16, 65)),
    ]
    assert dims[3].extremes() == [16, 64]  # high is exclusive, as in ray.tune.randint
    assert dims[1].extremes() == ["concat", "gated"]


@pytest.mark.parametrize(
    "space, message",
    [
        ({"train.lr": {"normal": [0, 1]}}, "train.lr: expected one of"),
        ({"train.lr": 0.1}, "train.lr: expected one of"),
        ({"train.lr": {"uniform": [1, 2], "choice": [1]}}, "train.lr: expected one of"),
        ({"train.lr": {"uniform": [0.1]}}, "train.lr: uniform: expected [low, high]"),
        ({"train.lr": {"uniform": [0.2, 0.1]}}, "train.lr: uniform: low must be < high"),
        ({"train.lr": {"loguniform": [0, 0.1]}}, "train.lr: loguniform: low must be > 0"),
        ({"train.lr": {"uniform": ["a", 1]}}, "train.lr: uniform: expected two numbers"),
        ({"train.epochs": {"randint": [1.5, 3]}}, "train.epochs: randint: expected two integers"),
        ({"model.fusion": {"choice": []}}, "model.fusion: choice: expected a non-empty list"),
        ({"train.name": {"choice": ["a", "b"]}}, "train.name: cannot be sampled"),
        ({"train..lr": {"choice": [1]}}, "'train..lr' is not a dotted config key"),
        ({}, "non-empty mapping"),
    ],
)
def test_malformed_space_entries_name_the_key(space, message):
    with pytest.raises(ConfigError) as e:
        parse_space(space)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "space, message",
    [
        (
            {"train.lrr": {"uniform": [0.1, 0.2]}},
            "space train.lrr: value 0.1 is rejected by the config: unknown config key 'train.lrr'",
        ),
        ({"model.fusion": {"choice": ["concat", "sum"]}}, "space model.fusion: value 'sum' is rejected"),
        (
            {"model.dropout": {"uniform": [0.5, 1.5]}},
            "space model.dropout: value 1.5 is rejected by the config: model.dropout: must be within [0, 1]",
        ),
        (
            {"train.epochs": {"uniform": [1, 3]}},
            "space train.epochs: value 1.0 is rejected by the config: train.epochs: expected an integer",
        ),
        ({"train.batch_size": {"randint": [0, 8]}}, "space train.batch_size: value 0 is rejected"),
    ],
)
def test_values_the_config_rejects_fail_naming_the_key(space, message):
    with pytest.raises(ConfigError) as e:
        validate_space(DEMO, parse_space(space))
    assert message in str(e.value)


def test_combinations_of_extremes_are_checked_too():
    # Each alone is fine with the demo's hidden_dim 64 / fusion_heads 4; 64 with 3 heads is not.
    space = parse_space(
        {
            "model.fusion": {"choice": ["concat", "cross_attention"]},
            "model.hidden_dim": {"choice": [48, 64]},
            "model.fusion_heads": {"choice": [4, 3]},
        }
    )
    with pytest.raises(ConfigError, match=r"space: the combination .*'model.fusion_heads': 3.* model.fusion_heads"):
        validate_space(DEMO, space)


def test_valid_space_yields_every_corner_config():
    configs = validate_space(
        DEMO, parse_space({"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.fusion": {"choice": ["concat", "gated"]}})
    )
    assert sorted((c.train.lr, c.model.fusion) for c in configs) == [
        (1e-4, "concat"),
        (1e-4, "gated"),
        (1e-2, "concat"),
        (1e-2, "gated"),
    ]
    assert all(c.data == load_config(REPO / "configs/demo.yaml").data for c in configs)


def test_the_shipped_example_space_fits_every_shipped_config():
    dims = tune.load_space(REPO / "configs/tune/space.yaml")
    assert not tune.needs_own_preprocessing(dims)  # the example shares one preprocessing pass
    for path in sorted((REPO / "configs").glob("*.yaml")):
        validate_space(config_to_dict(load_config(path)), dims)


def test_with_values_sets_nested_keys_and_validates():
    cfg = with_values(DEMO, {"train.lr": 0.01, "model.text_encoder.dim": 16, "model.loss_weights.label": 2.0})
    assert (cfg.train.lr, cfg.model.text_encoder.dim, cfg.model.loss_weights) == (0.01, 16, {"label": 2.0})
    with pytest.raises(ConfigError, match="train.lr: is a value"):
        with_values(DEMO, {"train.lr.x": 1})


@pytest.mark.parametrize(
    "key, own",
    [
        ("train.lr", False),
        ("model.fusion", False),
        ("model.text_encoder.dim", False),
        ("data.image.size", True),
        ("data", True),
        ("model.text_encoder.tokenizer", True),
        ("model.tasks.label", True),
        ("model.text_encoder", True),
        ("storage.s3_region", True),
        ("train.resume_from", True),
    ],
)
def test_keys_that_change_preprocessing_make_each_trial_preprocess(key, own):
    assert tune.needs_own_preprocessing([Dimension(key, "choice", (None,))]) is own


def test_trial_resources_and_concurrency_leave_a_cpu_for_reads():
    cfg = config_from_dict(
        {
            "train": {"num_workers": 2, "resources_per_worker": {"CPU": 0.5}},
            "data": {"preprocess": {"concurrency": 2, "num_cpus": 0.25}},
        }
    )
    assert trial_resources(cfg, reads_data=False) == {"CPU": pytest.approx(1.0 + tune.DRIVER_CPU)}
    assert trial_resources(cfg, reads_data=True) == {"CPU": pytest.approx(1.5 + tune.DRIVER_CPU)}
    assert concurrency({"CPU": 8.0}, trial_resources(cfg, False), reads_data=False) == 7  # 8 / 1.01
    assert concurrency({"CPU": 8.0}, trial_resources(cfg, True), reads_data=True) == 4  # (8 - 1) / 1.51
    assert concurrency({"CPU": 2.0}, {"CPU": 0.51}, reads_data=True) == 1
    with pytest.raises(ValueError, match="one trial needs 1.51 CPU .* the cluster has 2 with one whole CPU left"):
        concurrency({"CPU": 2.0}, trial_resources(cfg, True), reads_data=True)


def test_gpu_trials_are_limited_by_gpus():
    cfg = config_from_dict({"train": {"num_workers": 2, "use_gpu": True, "resources_per_worker": {"CPU": 1}}})
    need = trial_resources(cfg, reads_data=False)
    assert need["GPU"] == 2.0
    assert concurrency({"CPU": 64.0, "GPU": 8.0}, need, reads_data=False) == 4
    with pytest.raises(ValueError, match="needs 2 GPU .* the cluster has 0"):
        concurrency({"CPU": 64.0}, need, reads_data=False)


def test_default_mode_and_metric_names():
    assert [tune.default_mode(m) for m in ("val_loss", "train_loss", "val_mae", "val_accuracy", "val_auroc")] == [
        "min",
        "min",
        "min",
        "max",
        "max",
    ]
    task = task_from_dict({"name": "label", "kind": "multiclass", "classes": ["a", "b"]})
    assert {"train_loss", "val_loss", "val_accuracy", "val_macro_f1"} <= set(tune.metric_names([task]))


def test_results_table_keeps_types_and_falls_back_to_json_for_mixed_choices():
    dims = [
        Dimension("train.lr", "uniform", (0.1, 0.2)),
        Dimension("train.grad_clip", "choice", (None, 1.0)),
        Dimension("model.image_encoder.freeze", "choice", (True, 2)),
    ]
    rows = [
        {
            "trial_id": "a_00000",
            "train.lr": 0.15,
            "train.grad_clip": None,
            "model.image_encoder.freeze": True,
            "best_metric": 0.5,
            "metric_history": [0.7, 0.5],
        },
        {
            "trial_id": "a_00001",
            "train.lr": 0.11,
            "train.grad_clip": 1.0,
            "model.image_encoder.freeze": 2,
            "best_metric": None,
            "metric_history": [],
        },
    ]
    table = tune.results_table(rows, dims, "val_loss", "min")
    assert table.column("train.lr").to_pylist() == [0.15, 0.11]
    assert table.column("train.grad_clip").to_pylist() == [None, 1.0]
    assert table.column("model.image_encoder.freeze").to_pylist() == ["true", "2"]
    assert table.column("metric_history").to_pylist() == [[0.7, 0.5], []]
    assert table.schema.metadata[b"mmray.metric"] == b"val_loss"


def test_cli_rejects_a_bad_space_before_starting_ray(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {loguniform: [1.0e-4, 1.0e-2]}\nmodel.fusoin: {choice: [concat, gated]}\n")
    proc = run_cli(["tune", "--config", "configs/demo.yaml", "--space", str(space)], check=False, timeout=120)
    assert proc.returncode == 2
    assert (
        "space model.fusoin: value 'concat' is rejected by the config: unknown config key 'model.fusoin'" in proc.stderr
    )
    assert "started a local Ray instance" not in proc.stderr + proc.stdout


def test_a_moved_ray_internal_api_is_one_warning_not_a_crash(monkeypatch, capsys):
    from mmray.train.tune import ray_internals

    def moved():
        raise AttributeError("module 'ray._private.state' has no attribute 'state'")

    monkeypatch.setattr(ray_internals, "_orphaned_placement_groups", moved)
    ray_internals._warn_moved.cache_clear()
    assert [ray_internals.release_orphaned_placement_groups() for _ in range(3)] == [0, 0, 0]
    err = capsys.readouterr().err
    assert err.count("mmray tune: warning: cannot free stopped trials' placement groups") == 1
    assert f"checked on (Ray {ray_internals.RAY_CHECKED})" in err and "AttributeError" in err


@pytest.mark.parametrize("before", [None, "1"])
def test_trials_keep_the_driver_cwd_only_while_the_sweep_runs(monkeypatch, before):
    import os

    from mmray.train.tune import sweep

    if before is None:
        monkeypatch.delenv("RAY_CHDIR_TO_TRIAL_DIR", raising=False)
    else:
        monkeypatch.setenv("RAY_CHDIR_TO_TRIAL_DIR", before)
    with sweep._keep_driver_cwd():
        assert os.environ["RAY_CHDIR_TO_TRIAL_DIR"] == "0"
    assert os.environ.get("RAY_CHDIR_TO_TRIAL_DIR") == before


# --------------------------------------------------------------------------------------------------
# A real sweep
# --------------------------------------------------------------------------------------------------

SPACE = {
    "train.lr": {"loguniform": [1.0e-3, 1.0e-2]},
    "model.fusion": {"choice": ["concat", "gated"]},
    "model.dropout": {"uniform": [0.0, 0.3]},
    "train.batch_size": {"randint": [16, 33]},
}
EPOCHS = 2
TRIALS = 3  # the sweep's: one at a time, so ASHA's rule decides the last two from the first's losses
SEED = load_config(REPO / "configs/demo.yaml").train.seed  # the sweep's train.seed


def noop(config: dict) -> None:
    """A trainable for drawing trials without running them."""


def space_dims() -> list[Dimension]:
    """``SPACE`` as the sweep reads it from its YAML file: the keys' order, which the draws follow, is the file's."""
    return parse_space(yaml.safe_load(yaml.safe_dump(SPACE)))


def draw(seed: int, n: int = 4) -> list[dict]:
    """The values the sweep's search algorithm gives its first ``n`` trials, drawn as Tune's controller
    draws them with one trial at a time, without Ray."""
    from mmray.train.tune import sweep

    alg = sweep._tune_config(tune.TuneSettings(num_samples=n), "min", 1, EPOCHS, seed).search_alg
    alg.add_configurations({"draw": {"run": noop, "config": sweep._param_space(space_dims()), "num_samples": n}})
    values = []
    while (trial := alg.next_trial()) is not None:
        values.append(trial.config)
        alg.on_trial_complete(trial.trial_id)
    return values


def test_the_same_seed_samples_the_same_trials_and_another_seed_others():
    first = draw(SEED)
    assert len(first) == 4 and len({v["train.lr"] for v in first}) == 4
    assert draw(SEED) == first
    assert all(a["train.lr"] != b["train.lr"] for a, b in zip(draw(SEED + 1), first))


def test_the_search_algorithm_holds_the_concurrency_limit():
    """Tune ignores ``max_concurrent_trials`` once a search algorithm is given: the limit must be its own."""
    from mmray.train.tune import sweep

    alg = sweep._tune_config(tune.TuneSettings(num_samples=4), "min", 2, EPOCHS, SEED).search_alg
    alg.add_configurations({"draw": {"run": noop, "config": sweep._param_space(space_dims()), "num_samples": 4}})
    running = [alg.next_trial(), alg.next_trial()]
    assert None not in running and alg.next_trial() is None  # two run; the third waits
    alg.on_trial_complete(running[0].trial_id)
    assert alg.next_trial() is not None


def asha_stops(history: list[list[float]], reduction_factor: float) -> list[bool]:
    """Which trials ASHA (grace period 1, ``min``) stops after their first epoch when they run one
    at a time, in trial order: a trial stops when its first-epoch loss is worse than the
    ``1 - 1/reduction_factor`` quantile of the earlier trials' first-epoch losses."""
    stops, seen = [], []
    for losses in history:
        rewards = [-x for x in seen]
        cutoff = np.nanpercentile(rewards, (1 - 1 / reduction_factor) * 100) if rewards else None
        stops.append(cutoff is not None and -losses[0] < cutoff)
        seen.append(losses[0])
    return stops


@pytest.fixture(scope="module")
def sweep(ray_address, tmp_path_factory):
    from mmray.data.synthetic import make_dataset

    root = tmp_path_factory.mktemp("tune")
    data = make_dataset(root / "data", rows=240, seed=3)
    space = root / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    overrides = [
        f"data.train={data['train']['path']}",
        f"data.val={data['val']['path']}",
        f"train.storage_path={root / 'runs'}",
        f"train.epochs={EPOCHS}",
        "train.num_workers=1",
    ]
    args = [
        "tune",
        "--config",
        "configs/demo.yaml",
        "--space",
        str(space),
        "--num-samples",
        str(TRIALS),
        "--max-concurrent",
        "1",
        "--reduction-factor",
        "2",
        "--grace-period",
        "1",
        "--name",
        "sweep",
        *overrides,
    ]
    proc = run_cli_here(args)
    return {"root": root, "proc": proc, "out": proc.json, "overrides": overrides}


@pytest.mark.integration
def test_sweep_writes_one_row_per_trial_with_sampled_values_in_range(sweep):
    out = sweep["out"]
    assert out["results"] == str(sweep["root"] / "runs" / "sweep" / "results.parquet")
    assert (out["trials"], out["metric"], out["mode"]) == (TRIALS, "val_loss", "min")
    table = pq.read_table(out["results"])
    rows = table.to_pylist()
    assert len(rows) == TRIALS and len({r["trial_id"] for r in rows}) == TRIALS
    for r in rows:
        assert 1e-3 <= r["train.lr"] <= 1e-2
        assert r["model.fusion"] in ("concat", "gated")
        assert 0.0 <= r["model.dropout"] <= 0.3
        assert 16 <= r["train.batch_size"] <= 32 and isinstance(r["train.batch_size"], int)
        assert r["status"] in ("completed", "stopped_early") and r["error"] is None
        assert r["epochs"] == len(r["metric_history"]) in (1, 2)
        assert r["best_metric"] == min(r["metric_history"]) and r["final_metric"] == r["metric_history"][-1]
        assert Path(r["run_dir"], "history.jsonl").exists()  # each trial is a real Train run
        assert Path(r["checkpoint"], "model.safetensors").exists()
    # The top 5 is printed before the final JSON line.
    assert f"top {TRIALS} of {TRIALS} trials by val_loss (min):" in sweep["proc"].stdout


@pytest.mark.integration
def test_sweep_runs_the_trials_its_seed_draws(sweep):
    rows = sorted(pq.read_table(sweep["out"]["results"]).to_pylist(), key=lambda r: r["trial_id"])
    assert [{k: r[k] for k in SPACE} for r in rows] == draw(SEED, TRIALS)


@pytest.mark.integration
def test_asha_stops_exactly_the_trials_its_rule_says(sweep):
    rows = sorted(pq.read_table(sweep["out"]["results"]).to_pylist(), key=lambda r: r["trial_id"])
    stopped = [r["status"] == "stopped_early" for r in rows]
    assert any(stopped)  # the seeded trials (test_sweep_runs_the_trials_its_seed_draws) always include some
    assert stopped == asha_stops([r["metric_history"] for r in rows], reduction_factor=2)
    assert [r["epochs"] for r in rows] == [1 if s else EPOCHS for s in stopped]


@pytest.mark.integration
def test_best_config_is_the_best_trial_and_trains_unchanged(sweep, ray_address):
    out = sweep["out"]
    rows = pq.read_table(out["results"]).to_pylist()
    best = min(rows, key=lambda r: r["best_metric"])
    assert (out["best_trial"], out["best_metric"]) == (best["trial_id"], best["best_metric"])
    cfg = load_config(out["best_config"])
    base = config_to_dict(load_config(REPO / "configs/demo.yaml", sweep["overrides"]))
    assert cfg == with_values(base, {k: best[k] for k in SPACE})
    assert cfg.data.train and cfg.data.val and cfg.train.name is None  # data paths kept; a fresh run
    trained = run_cli_here(["train", "--config", out["best_config"]]).json
    assert trained["metrics"]["epoch"] == EPOCHS - 1
    assert Path(trained["run_dir"]).parent == sweep["root"] / "runs"
