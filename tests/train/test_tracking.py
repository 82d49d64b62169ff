"""history.jsonl always; TensorBoard and MLflow only when configured, failing early when missing."""

from __future__ import annotations

import importlib.util
import sys
import types

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


@pytest.mark.skipif(tracking._summary_writer_class() is None, reason="neither tensorboard nor tensorboardX installed")
def test_tensorboard_writes_scalars(tmp_path):
    cfg = config_from_dict({"train": {"tensorboard_dir": str(tmp_path / "tb")}})
    run_trackers(cfg, tmp_path)
    events = list((tmp_path / "tb" / "run-1").glob("events.out.tfevents.*"))
    assert len(events) == 1
    data = events[0].read_bytes()
    assert b"train_loss" in data and b"val_accuracy" in data and b"resumed_from_epoch" not in data


class FakeMlflow(types.ModuleType):
    """Records the calls mmray makes (mlflow itself is not installed here)."""

    def __init__(self):
        super().__init__("mlflow")
        self.calls: list[tuple] = []
        for name in ("set_tracking_uri", "set_experiment", "start_run", "log_params", "log_metrics", "end_run"):
            setattr(self, name, self._recorder(name))

    def _recorder(self, name):
        return lambda *a, **kw: self.calls.append((name, a, kw))


def test_mlflow_gets_params_and_metrics_per_epoch(tmp_path, monkeypatch):
    fake = FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.setattr(tracking, "check_trackers_available", lambda cfg: None)
    cfg = config_from_dict({"train": {"mlflow_tracking_uri": "file:///tmp/ml", "mlflow_experiment": "exp", "epochs": 7}})
    run_trackers(cfg, tmp_path)
    names = [c[0] for c in fake.calls]
    assert names == ["set_tracking_uri", "set_experiment", "start_run", "log_params", "log_metrics", "log_metrics", "end_run"]
    assert fake.calls[0][1] == ("file:///tmp/ml",) and fake.calls[1][1] == ("exp",)
    assert fake.calls[2][2]["run_name"] == "run-1"
    params = fake.calls[3][1][0]
    assert params["train.epochs"] == "7" and params["model.fusion"] == "concat"
    assert fake.calls[4][1][0] == {"train_loss": 1.5, "val_accuracy": 0.4, "lr": 0.01}
    assert fake.calls[5][2] == {"step": 1}


def test_missing_packages_fail_naming_the_key(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="train.tensorboard_dir"):
        tracking.check_trackers_available(config_from_dict({"train": {"tensorboard_dir": "/tmp/tb"}}))
    with pytest.raises(ValueError, match="train.mlflow_tracking_uri"):
        tracking.check_trackers_available(config_from_dict({"train": {"mlflow_tracking_uri": "file:///x"}}))
    tracking.check_trackers_available(config_from_dict({}))  # nothing configured: nothing needed


SLASHED_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize("uri", [f"https://admin:{SLASHED_SECRET}@mlflow.internal:5000",
                                 "http://token@mlflow.internal", f"postgresql://u:{SLASHED_SECRET}@db/mlflow"])
def test_credentials_in_the_mlflow_uri_are_refused_and_not_echoed(uri):
    with pytest.raises(ConfigError, match="train.mlflow_tracking_uri: must not embed credentials") as e:
        config_from_dict({"train": {"mlflow_tracking_uri": uri}})
    assert "K7MDENG" not in str(e.value) and "token@" not in str(e.value)
    for fine in ("http://mlflow.internal:5000", "file:///tmp/me@corp/mlruns", "./mlruns", "databricks://profile"):
        assert config_from_dict({"train": {"mlflow_tracking_uri": fine}}).train.mlflow_tracking_uri == fine


def test_mlflow_params_are_the_redacted_config(tmp_path, monkeypatch):
    fake = FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.setattr(tracking, "check_trackers_available", lambda cfg: None)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEJr-session-token")
    cfg = config_from_dict({
        "train": {"mlflow_tracking_uri": "http://mlflow:5000", "name": "FwoGZXIvYXdzEJr-session-token"},
        "data": {"train": f"s3://AKIAIOSFODNN7EXAMPLE:{SLASHED_SECRET}@bucket/train"},
        "model": {"text_encoder": {"tokenizer": f"https://user:{SLASHED_SECRET}@hub.internal/tok"}},
    })  # fmt: skip
    run_trackers(cfg, tmp_path)
    params = next(c[1][0] for c in fake.calls if c[0] == "log_params")
    logged = repr(params)
    assert "K7MDENG" not in logged and "AKIAIOSFODNN7EXAMPLE" not in logged and "FwoGZXIvYXdzEJr" not in logged
    assert params["data.train"] == "s3://***@bucket/train" and params["train.name"] == "***"
    assert params["model.text_encoder.tokenizer"] == "https://***@hub.internal/tok"
