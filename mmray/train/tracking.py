"""Where epoch records go: ``history.jsonl`` in the run directory always; TensorBoard and MLflow when
configured (``train.tensorboard_dir``, ``train.mlflow_tracking_uri``) and installed.

Only rank 0 tracks. Neither TensorBoard nor MLflow is a dependency of mmray: asking for one that is
not installed fails at the start of the run with the key and the package to install.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Protocol
from urllib.parse import urlparse

from mmray.config import Config, config_to_dict, flatten
from mmray.data import storage

__all__ = ["HISTORY_FILE", "Tracker", "check_trackers_available", "make_trackers", "read_history"]

HISTORY_FILE = "history.jsonl"


class Tracker(Protocol):
    def log_epoch(self, record: dict[str, Any], history: list[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


class HistoryFile:
    """Rewrites ``<run_dir>/history.jsonl`` (one JSON object per finished epoch) after every epoch.

    The whole file is written each time from the history carried in the checkpoint, so after a
    resume the file lists each epoch exactly once, even if the dead run had written a later line.
    """

    def __init__(self, run_dir: str, cfg: Config):
        self.uri, self.storage = storage.join(run_dir, HISTORY_FILE), cfg.storage

    def log_epoch(self, record: dict[str, Any], history: list[dict[str, Any]]) -> None:
        storage.write_text(self.uri, "".join(json.dumps(h) + "\n" for h in history), self.storage)

    def close(self) -> None:
        pass


def read_history(run_dir: str, cfg: Config | None = None) -> list[dict[str, Any]]:
    text = storage.read_text(storage.join(run_dir, HISTORY_FILE), cfg.storage if cfg else None)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _numeric(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _summary_writer_class():
    """torch's writer when the ``tensorboard`` package is there, else tensorboardX's (same API)."""
    if importlib.util.find_spec("tensorboard") is not None:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    if importlib.util.find_spec("tensorboardX") is not None:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    return None


class TensorBoardTracker:
    """Scalars per epoch under ``<tensorboard_dir>/<run name>`` (a local or mounted directory)."""

    def __init__(self, log_dir: str):
        self.writer = _summary_writer_class()(log_dir=log_dir)

    def log_epoch(self, record: dict[str, Any], history: list[dict[str, Any]]) -> None:
        epoch = int(record["epoch"])
        for name, value in _numeric(record).items():
            if name != "epoch":
                self.writer.add_scalar(name, value, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def is_mlflow_file_store(uri: str) -> bool:
    """True for the URIs MLflow serves from its file store: ``file://...`` and plain paths (``./mlruns``)."""
    return urlparse(uri).scheme in ("", "file")


class MlflowTracker:
    """One MLflow run per training process: the flattened, redacted config as params, epoch metrics by step.

    The tracking URI itself never carries credentials (config validation refuses them): MLflow reads
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` / ``MLFLOW_TRACKING_TOKEN`` instead.
    """

    def __init__(self, cfg: Config, run_name: str):
        import mlflow

        self.mlflow = mlflow
        if is_mlflow_file_store(cfg.train.mlflow_tracking_uri):
            # MLflow 3 refuses its file store (in maintenance mode) unless this is set; the config asked
            # for a file store by name, so it is set for this process rather than failing the run.
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        mlflow.set_tracking_uri(cfg.train.mlflow_tracking_uri)
        mlflow.set_experiment(cfg.train.mlflow_experiment)
        mlflow.start_run(run_name=run_name, tags={"mmray.run": run_name})
        # Redacted first, then cut (a cut could split a secret from its "@"); MLflow caps values at 500.
        mlflow.log_params({k: storage.redact(str(v))[:500] for k, v in flatten(config_to_dict(cfg)).items()})

    def log_epoch(self, record: dict[str, Any], history: list[dict[str, Any]]) -> None:
        metrics = {k: v for k, v in _numeric(record).items() if k != "epoch"}
        self.mlflow.log_metrics(metrics, step=int(record["epoch"]))

    def close(self) -> None:
        self.mlflow.end_run()


def check_trackers_available(cfg: Config) -> None:
    """Fails before any work when a configured tracker's package is missing."""
    if cfg.train.tensorboard_dir and _summary_writer_class() is None:
        raise ValueError(
            "train.tensorboard_dir is set but neither `tensorboard` nor `tensorboardX` is installed "
            "(pip install tensorboard)"
        )
    if cfg.train.mlflow_tracking_uri and importlib.util.find_spec("mlflow") is None:
        raise ValueError("train.mlflow_tracking_uri is set but `mlflow` is not installed (pip install mlflow)")


def make_trackers(cfg: Config, run_dir: str, run_name: str) -> list[Tracker]:
    """The rank-0 trackers of this run: history always, then the optional ones."""
    check_trackers_available(cfg)
    trackers: list[Tracker] = [HistoryFile(run_dir, cfg)]
    if cfg.train.tensorboard_dir:
        trackers.append(TensorBoardTracker(storage.join(cfg.train.tensorboard_dir, run_name)))
    if cfg.train.mlflow_tracking_uri:
        trackers.append(MlflowTracker(cfg, run_name))
    return trackers
