"""Driver-side wiring that needs no cluster: scaling, loop inputs, early input errors."""

from __future__ import annotations

import pickle

import pytest

from mmray.config import ConfigError, TrainConfig, config_from_dict, load_config
from mmray.data.labels import Task
from mmray.data.preprocess import PreprocessSpec
from mmray.train import launcher
from mmray.train.loop import LoopInputs


def test_scaling_config_maps_workers_gpus_and_resources():
    cpu = launcher.scaling_config(TrainConfig(num_workers=3, resources_per_worker={"CPU": 0.5}))
    assert (cpu.num_workers, cpu.use_gpu) == (3, False)
    assert cpu._resources_per_worker_not_none == {"CPU": 0.5}
    eight_gpus = TrainConfig(num_workers=8, use_gpu=True, resources_per_worker={"CPU": 6, "memory": 2e9})
    gpu = launcher.scaling_config(eight_gpus)
    assert gpu.num_workers == 8 and gpu._resources_per_worker_not_none == {"CPU": 6, "memory": 2e9, "GPU": 1}


def test_loop_inputs_travel_to_the_workers_in_the_loop_config():
    cfg = config_from_dict({"train": {"epochs": 2, "before_step": "tests.faults:maybe_fail"}})
    task = Task("label", "multiclass", ("a", "b"))
    spec = PreprocessSpec.from_config(cfg.data, cfg.storage, tasks=[task])
    counts = {"train": {"rows_in": 101, "rows_used": 100, "rows_quarantined": 1}}
    prepared = launcher.Prepared([task], spec, {"vocab.txt": b"x"}, 10, {}, counts, cached=True)
    inputs = launcher.loop_inputs(cfg, prepared, "/runs/r", "r")
    assert (inputs.train_rows, inputs.run_dir, inputs.run_name, inputs.vocab_size) == (100, "/runs/r", "r", 10)
    assert inputs.preprocess == spec.to_dict() and inputs.tokenizer_files == {"vocab.txt": b"x"}
    # Ray Train pickles train_loop_config and hands the loop a dict.
    received = LoopInputs.from_loop_config(pickle.loads(pickle.dumps(inputs.as_loop_config())))
    assert received == inputs and received.config.train.before_step == "tests.faults:maybe_fail"
    assert received.tasks == [task]


def test_a_before_step_hook_that_cannot_be_imported_fails_on_the_driver():
    cfg = config_from_dict({"data": {"train": "t", "val": "v"}, "train": {"before_step": "no_such_mmray_module:hook"}})
    with pytest.raises(ConfigError, match="train.before_step: cannot import module 'no_such_mmray_module'"):
        launcher.run_training(cfg)  # fails before any data is read or Ray is touched


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


def test_epoch_printer_prints_each_new_epoch_once_with_an_eta(tmp_path, capsys):
    import json

    from mmray.config import load_config

    cfg = load_config(None, ["train.epochs=4"])
    history = tmp_path / "history.jsonl"
    record = {
        "train_loss": 0.5,
        "val_loss": 0.4,
        "val_accuracy": 0.75,
        "rows_per_s": 1000.0,
        "epoch_s": 8.0,
        "eval_s": 2.0,
    }
    history.write_text(json.dumps({**record, "epoch": 0}) + "\n")  # an epoch done before this run: resumed
    printer = launcher.EpochPrinter(str(tmp_path), cfg)
    assert capsys.readouterr().err == "mmray train: resuming: 1 epoch(s) already done\n"
    printer.poll()
    assert capsys.readouterr().err == ""
    history.write_text("".join(json.dumps({**record, "epoch": e}) + "\n" for e in range(3)))
    printer.poll()
    printer.poll()
    assert capsys.readouterr().err.splitlines() == [
        "epoch 2/4  train_loss 0.5  val_loss 0.4  val_accuracy 0.750  1,000 rows/s  ETA 0:20",
        "epoch 3/4  train_loss 0.5  val_loss 0.4  val_accuracy 0.750  1,000 rows/s  ETA 0:10",
    ]


def test_on_a_terminal_a_live_status_line_sits_under_the_epoch_lines(tmp_path, capsys, monkeypatch):
    import json
    import sys

    from mmray.config import load_config

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    printer = launcher.EpochPrinter(str(tmp_path), load_config(None, ["train.epochs=2"]))
    printer.poll()
    (tmp_path / "history.jsonl").write_text(json.dumps({"epoch": 0, "train_loss": 0.5, "epoch_s": 61.0}) + "\n")
    printer.poll()
    printer.clear()
    err = capsys.readouterr().err
    empty, half = "[" + "-" * 24 + "]", "[" + "#" * 12 + "-" * 12 + "]"
    assert err == (
        f"\r\033[K{empty} epoch 1/2 running 0:00"
        "\r\033[Kepoch 1/2  train_loss 0.5  ETA 1:01\n"
        f"\r\033[K{half} epoch 2/2 running 0:00 (one takes ~1:01)"
        "\r\033[K"
    )


def test_pretraining_reads_no_labels_and_aligns_every_row():
    from mmray.train.launcher import pretrain_config

    cfg = pretrain_config(load_config(None, ["model.align.weight=1", "model.tasks={label: binary}"]))
    assert cfg.data.label_columns == [] and cfg.model.tasks == {} and cfg.model.align.pairs == "all"
    assert (cfg.train.checkpoint_metric, cfg.train.checkpoint_mode) == ("val_align_loss", "min")
    kept = pretrain_config(load_config(None, ["model.align.weight=1", "train.checkpoint_metric=val_rows"]))
    assert kept.train.checkpoint_metric == "val_rows"  # a metric the user chose stays
    with pytest.raises(ConfigError, match=r"model\.align\.weight: mmray pretrain trains the alignment"):
        pretrain_config(load_config(None, []))
    with pytest.raises(ConfigError, match=r"model\.align\.pairs: 'label=yes' names a label"):
        pretrain_config(load_config(None, ["model.align.weight=1", "model.align.pairs=label=yes"]))
