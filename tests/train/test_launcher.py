"""Driver-side wiring that needs no cluster: scaling, loop inputs, early input errors."""

from __future__ import annotations

import pytest

from mmray.config import config_from_dict
from mmray.data.labels import Task
from mmray.data.preprocess import PreprocessSpec
from mmray.train import launcher
from mmray.train.faults import ENV_VAR


def test_scaling_config_maps_workers_gpus_and_resources():
    cpu = launcher.scaling_config(config_from_dict({"train": {"num_workers": 3, "resources_per_worker": {"CPU": 0.5}}}))
    assert (cpu.num_workers, cpu.use_gpu) == (3, False)
    assert cpu._resources_per_worker_not_none == {"CPU": 0.5}
    gpu = launcher.scaling_config(config_from_dict(
        {"train": {"num_workers": 8, "use_gpu": True, "resources_per_worker": {"CPU": 6, "memory": 2e9}}}
    ))  # fmt: skip
    assert gpu.num_workers == 8 and gpu._resources_per_worker_not_none == {"CPU": 6, "memory": 2e9, "GPU": 1}


def test_loop_inputs_are_plain_data_and_carry_the_fault_file(monkeypatch):
    cfg = config_from_dict({"train": {"epochs": 2}})
    task = Task("label", "multiclass", ("a", "b"))
    spec = PreprocessSpec.from_config(cfg.data, cfg.storage, tasks=[task])
    monkeypatch.delenv(ENV_VAR, raising=False)
    inputs = launcher.loop_inputs(cfg, [task], spec, {"vocab.txt": b"x"}, 10, 100, "/runs/r", "r")
    assert inputs["fault_file"] is None and inputs["config"]["train"]["epochs"] == 2
    assert inputs["tasks"] == [task.to_dict()] and inputs["run_name"] == "r" and inputs["train_rows"] == 100
    monkeypatch.setenv(ENV_VAR, "/tmp/fault.json")
    assert launcher.loop_inputs(cfg, [task], spec, {}, 10, 100, "/runs/r", "r")["fault_file"] == "/tmp/fault.json"


def test_resume_from_must_be_a_checkpoint(tmp_path):
    cfg = config_from_dict({"data": {"train": "t", "val": "v"}, "train": {"resume_from": str(tmp_path)}})
    with pytest.raises(FileNotFoundError, match="train.resume_from: .* is not an mmray checkpoint"):
        launcher.run_training(cfg)  # fails before any data is read or Ray is touched


def test_missing_tracker_package_fails_before_any_work(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    cfg = config_from_dict({"data": {"train": "t", "val": "v"}, "train": {"tensorboard_dir": "/tmp/tb"}})
    with pytest.raises(ValueError, match="train.tensorboard_dir"):
        launcher.run_training(cfg)
