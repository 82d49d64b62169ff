"""Train state round trip (model, optimizer, scheduler, scaler, RNG, history) and early stopping."""

from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest
import torch

from mmray.checkpoint import TRAIN_STATE_FILE, CheckpointInfo, save_checkpoint
from mmray.config import EarlyStoppingConfig, config_from_dict, config_to_dict
from mmray.data.labels import Task
from mmray.train.loop import build_parts, train_epoch
from mmray.train.state import (
    Progress,
    early_stopping_update,
    get_rng_state,
    load_train_state,
    restore,
    set_rng_state,
)
from tests.train.test_loop import CPU, fusion_batches, tiny_cfg

CLS = Task("label", "multiclass", ("a", "b", "c"))


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_state_round_trips_every_generator(seed):
    state = get_rng_state()
    first = draws()
    set_rng_state(state)
    assert draws() == first


def trained_parts(cfg):
    parts = build_parts(cfg, [CLS], 30, 16, 1, CPU)
    train_epoch(parts, fusion_batches(), cfg, [CLS])
    return parts


def save(tmp_path, parts, cfg, progress, rngs):
    from mmray.train.state import train_state

    info = CheckpointInfo(cfg.model, {"text": {}, "image": {}}, (CLS,), 30, progress.epoch, {})
    state = train_state(parts.optimizer, parts.scheduler, parts.scaler, progress, rngs)
    save_checkpoint(tmp_path, parts.model, info, {}, state)


def with_augment(cfg):
    """Random crops/flips draw from torch's RNG every batch: a resume must continue that stream."""
    raw = config_to_dict(cfg)
    raw["data"]["image"]["augment"] = True
    return config_from_dict(raw)


def test_restore_continues_training_exactly(tmp_path):
    cfg = with_augment(tiny_cfg(precision="fp16", batch_size=8, epochs=4))
    parts = trained_parts(cfg)
    history = [{"epoch": 0, "val_loss": 1.0}]
    save(tmp_path, parts, cfg, Progress(epoch=0, step=2, history=history, best=1.0, bad_epochs=0), [get_rng_state()])
    scale_at_save = parts.scaler.get_scale()
    # The uninterrupted run's next epoch ...
    train_epoch(parts, fusion_batches(), cfg, [CLS])
    expected = {k: v.clone() for k, v in parts.model.state_dict().items()}

    fresh = build_parts(cfg, [CLS], 30, 16, 1, CPU)
    torch.manual_seed(1234)  # whatever the new process did before: the checkpoint's RNG wins
    progress = restore(str(tmp_path), fresh.model, fresh.optimizer, fresh.scheduler, fresh.scaler, rank=0, world_size=1)
    assert (progress.epoch, progress.next_epoch, progress.step, progress.history) == (0, 1, 2, history)
    assert progress.best == 1.0 and progress.resumed_from_epoch == 0 and progress.rng_restored
    assert fresh.scheduler.last_epoch == parts.scheduler.last_epoch - 2
    assert fresh.scaler.get_scale() == scale_at_save
    # ... equals the resumed run's next epoch, bit for bit.
    train_epoch(fresh, fusion_batches(), cfg, [CLS])
    for k, v in fresh.model.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0, msg=k)


def test_train_state_loads_without_unpickling_code(tmp_path):
    cfg = tiny_cfg(batch_size=8)
    parts = trained_parts(cfg)
    save(tmp_path, parts, cfg, Progress(epoch=0), [get_rng_state()])
    state = load_train_state(str(tmp_path))  # weights_only=True inside
    assert set(state) >= {"optimizer", "scheduler", "scaler", "epoch", "step", "rng", "history", "best", "bad_epochs"}
    torch.save({"fn": draws}, tmp_path / TRAIN_STATE_FILE)  # a function needs full unpickling ...
    with pytest.raises(pickle.UnpicklingError):
        load_train_state(str(tmp_path))  # ... which is refused


def test_rng_is_not_restored_when_the_world_size_changed(tmp_path):
    cfg = tiny_cfg(batch_size=8)
    parts = trained_parts(cfg)
    save(tmp_path, parts, cfg, Progress(epoch=0), [get_rng_state(), get_rng_state()])
    fresh = build_parts(cfg, [CLS], 30, 16, 1, CPU)
    progress = restore(str(tmp_path), fresh.model, fresh.optimizer, fresh.scheduler, fresh.scaler, 0, 1)
    assert not progress.rng_restored and progress.next_epoch == 1


def test_inference_bundle_gives_weights_and_a_fresh_start(tmp_path):
    cfg = tiny_cfg(batch_size=8)
    parts = trained_parts(cfg)
    save_checkpoint(tmp_path, parts.model, CheckpointInfo(cfg.model, {"text": {}, "image": {}}, (CLS,), 30, 0, {}), {})
    fresh = build_parts(cfg, [CLS], 30, 16, 1, CPU)
    progress = restore(str(tmp_path), fresh.model, fresh.optimizer, fresh.scheduler, fresh.scaler, 0, 1)
    assert progress == Progress()
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(v, parts.model.state_dict()[k]), k


def test_optimizer_mismatch_is_a_clear_error(tmp_path):
    cfg = tiny_cfg(batch_size=8)
    parts = trained_parts(cfg)
    save(tmp_path, parts, cfg, Progress(epoch=0), [get_rng_state()])
    other = build_parts(cfg, [CLS], 30, 16, 1, CPU)
    other.optimizer.param_groups.pop()  # a different group layout, as after changing what is frozen
    with pytest.raises(ValueError, match="optimizer state does not match"):
        restore(str(tmp_path), other.model, other.optimizer, other.scheduler, other.scaler, 0, 1)


@pytest.mark.parametrize(
    "mode,values,stop_at",
    [
        ("min", [1.0, 0.9, 0.95, 0.97, 0.5], 3),  # two epochs without a new minimum
        ("max", [0.5, 0.6, 0.6, 0.55, 0.9], 3),  # equal is not better
        ("min", [1.0, 0.9, 0.8, 0.7, 0.6], None),
        ("min", [1.0, float("nan"), float("nan")], 2),  # a diverged run stops
    ],
)
def test_early_stopping(mode, values, stop_at):
    cfg = EarlyStoppingConfig(metric="val_loss", patience=2, mode=mode)
    best, bad, stopped = None, 0, None
    for epoch, v in enumerate(values):
        best, bad, stop = early_stopping_update(cfg, {"val_loss": v}, best, bad)
        if stop:
            stopped = epoch
            break
    assert stopped == stop_at
    assert not math.isnan(best)


def test_early_stopping_off_and_unknown_metric():
    assert early_stopping_update(EarlyStoppingConfig(), {"val_loss": 1.0}, None, 0) == (None, 0, False)
    with pytest.raises(ValueError, match=r"train.early_stopping.metric: no metric 'val_acc'.*val_accuracy"):
        early_stopping_update(EarlyStoppingConfig(metric="val_acc"), {"val_loss": 1.0, "val_accuracy": 0.5}, None, 0)
