"""history.jsonl always; TensorBoard and MLflow only when configured, failing early when missing."""

from __future__ import annotations

import importlib.util
import os

import pytest

from mmray.config import ConfigError, config_from_dict
from mmray.train import tracking

RECORDS = [
    {"epoch": 0, "train_loss": 1.5, "val_accuracy": 0.4, "lr": 0.01, "resumed_from_epoch": None},
    {"epoch": 1, "train_loss": 1.1, "val_accuracy": 0.6, "lr": 0.005, "resumed_from_epoch": None},
]


def test_history_file_holds_each_epoch_once(tmp_path):
    cfg = config_from_dict({})
    tracker = tracking.HistoryFile(str(tmp_path), cfg)
    tracker.log_epoch(RECORDS[0], RECORDS[:1])
    tracker.log_epoch(RECORDS[1], RECORDS)
    tracker.log_epoch(RECORDS[1], RECORDS)  # a re-report after resume rewrites, never appends twice
    assert tracking.read_history(str(tmp_path)) == RECORDS


def test_only_history_by_default(tmp_path):
    trackers = tracking.make_trackers(config_from_dict({}), str(tmp_path), "run")
    assert [type(t).__name__ for t in trackers] == ["HistoryFile"]


def run_trackers(cfg, tmp_path) -> None:
    """What the loop does on rank 0: log every epoch to every tracker, then close them."""
    trackers = tracking.make_trackers(cfg, str(tmp_path), "run-1")
    for record in RECORDS:
        for t in trackers:
            t.log_epoch(record, RECORDS)
    for t in trackers:
        t.close()


def test_tensorboard_writes_scalars(tmp_path):
    cfg = config_from_dict({"train": {"tensorboard_dir": str(tmp_path / "tb")}})
    run_trackers(cfg, tmp_path)
    events = list((tmp_path / "tb" / "run-1").glob("events.out.tfevents.*"))
    assert len(events) == 1
    data = events[0].read_bytes()
    assert b"train_loss" in data and b"val_accuracy" in data and b"resumed_from_epoch" not in data


@pytest.fixture
def file_store_not_allowed(monkeypatch):
    """``MLFLOW_ALLOW_FILE_STORE`` unset, as in a user's shell, and unset again after the test.

    Set first so that the delete is recorded: ``delenv`` of an absent variable records nothing, and the
    value the tracker sets would then outlive the test and hide the bug from later tests.
    """
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")


@pytest.mark.parametrize(
    ("uri", "file_store"),
    [
        ("file:///tmp/mlruns", True),
        ("./mlruns", True),
        ("/abs/mlruns", True),
        ("mlruns", True),
        ("sqlite:///mlruns.db", False),
        ("http://mlflow.internal:5000", False),
        ("databricks://profile", False),
    ],
)
def test_file_store_uris_are_recognised(uri, file_store):
    assert tracking.is_mlflow_file_store(uri) is file_store


def test_mlflow_file_store_works_without_the_opt_in_variable(tmp_path, monkeypatch, file_store_not_allowed):
    """A plain ``./mlruns`` path, the way users write it, with ``MLFLOW_ALLOW_FILE_STORE`` unset."""
    mlflow = pytest.importorskip("mlflow", reason="mlflow is a dev dependency (pip install -e '.[dev]')")
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({"train": {"mlflow_tracking_uri": "./mlruns", "mlflow_experiment": "exp"}})
    tracker = tracking.MlflowTracker(cfg, "run-1")
    tracker.log_epoch(RECORDS[0], RECORDS[:1])
    tracker.close()
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"  # for this process only: the fixture unsets it

    client = mlflow.tracking.MlflowClient((tmp_path / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.info.run_name == "run-1" and run.info.status == "FINISHED"
    assert run.data.metrics == {"train_loss": 1.5, "val_accuracy": 0.4, "lr": 0.01}


def test_mlflow_gets_params_and_metrics_per_epoch(tmp_path, file_store_not_allowed):
    """The real ``mlflow`` client writing to a ``file://`` store, read back through its own API."""
    mlflow = pytest.importorskip("mlflow", reason="mlflow is a dev dependency (pip install -e '.[dev]')")
    uri = (tmp_path / "mlruns").as_uri()
    cfg = config_from_dict({"train": {"mlflow_tracking_uri": uri, "mlflow_experiment": "exp", "epochs": 7}})
    run_trackers(cfg, tmp_path)

    client = mlflow.tracking.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.info.run_name == "run-1" and run.info.status == "FINISHED"
    assert run.data.tags["mmray.run"] == "run-1"
    assert run.data.params["train.epochs"] == "7" and run.data.params["model.fusion"] == "concat"
    assert run.data.params["train.mlflow_tracking_uri"] == uri
    history = {
        name: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
        for name in ("train_loss", "val_accuracy", "lr")
    }
    assert history == {
        "train_loss": [(0, 1.5), (1, 1.1)],
        "val_accuracy": [(0, 0.4), (1, 0.6)],
        "lr": [(0, 0.01), (1, 0.005)],
    }
    assert set(run.data.metrics) == {"train_loss", "val_accuracy", "lr"}  # no epoch, no None-valued fields


def test_missing_packages_fail_naming_the_key(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="train.tensorboard_dir"):
        tracking.check_trackers_available(config_from_dict({"train": {"tensorboard_dir": "/tmp/tb"}}))
    with pytest.raises(ValueError, match="train.mlflow_tracking_uri"):
        tracking.check_trackers_available(config_from_dict({"train": {"mlflow_tracking_uri": "file:///x"}}))
    tracking.check_trackers_available(config_from_dict({}))  # nothing configured: nothing needed


SLASHED_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize(
    "uri",
    [
        f"https://admin:{SLASHED_SECRET}@mlflow.internal:5000",
        "http://token@mlflow.internal",
        f"postgresql://u:{SLASHED_SECRET}@db/mlflow",
    ],
)
def test_credentials_in_the_mlflow_uri_are_refused_and_not_echoed(uri):
    with pytest.raises(ConfigError, match="train.mlflow_tracking_uri: must not embed credentials") as e:
        config_from_dict({"train": {"mlflow_tracking_uri": uri}})
    assert "K7MDENG" not in str(e.value) and "token@" not in str(e.value)
    for fine in ("http://mlflow.internal:5000", "file:///tmp/me@corp/mlruns", "./mlruns", "databricks://profile"):
        assert config_from_dict({"train": {"mlflow_tracking_uri": fine}}).train.mlflow_tracking_uri == fine


def test_mlflow_params_are_the_redacted_config(tmp_path, monkeypatch, file_store_not_allowed):
    mlflow = pytest.importorskip("mlflow", reason="mlflow is a dev dependency (pip install -e '.[dev]')")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEJr-session-token")
    uri = (tmp_path / "mlruns").as_uri()
    cfg = config_from_dict(
        {
            "train": {"mlflow_tracking_uri": uri, "name": "FwoGZXIvYXdzEJr-session-token"},
            "data": {"train": f"s3://AKIAIOSFODNN7EXAMPLE:{SLASHED_SECRET}@bucket/train"},
            "model": {"text_encoder": {"tokenizer": f"https://user:{SLASHED_SECRET}@hub.internal/tok"}},
        }
    )
    run_trackers(cfg, tmp_path)
    client = mlflow.tracking.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.train.mlflow_experiment).experiment_id])
    params = run.data.params
    logged = repr(params)
    assert "K7MDENG" not in logged and "AKIAIOSFODNN7EXAMPLE" not in logged and "FwoGZXIvYXdzEJr" not in logged
    assert params["data.train"] == "s3://***@bucket/train" and params["train.name"] == "***"
    assert params["model.text_encoder.tokenizer"] == "https://***@hub.internal/tok"
    stored = "".join(p.read_text(errors="replace") for p in (tmp_path / "mlruns").rglob("*") if p.is_file())
    assert "K7MDENG" not in stored and "FwoGZXIvYXdzEJr" not in stored  # nowhere in the store either
