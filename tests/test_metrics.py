"""Losses and metrics: the weighted training loss that every metric report's ``loss`` means."""

from __future__ import annotations

import math

import torch

from mmray.data.labels import Task
from mmray.metrics import weighted_row_loss


def test_weighted_row_loss_weights_each_task_and_defaults_to_one():
    tasks = [Task("label", "multiclass", ("a", "b")), Task("score", "regression")]
    logits = {"label": torch.tensor([[2.0, 0.0], [0.0, 0.0]]), "score": torch.tensor([[1.0], [3.0]])}
    targets = {"label": torch.tensor([0, 1]), "score": torch.tensor([0.0, 1.0])}
    loss = weighted_row_loss(tasks, logits, targets, {"label": 2.0})  # "score" unnamed: weight 1
    # cross-entropy of [2, 0] -> class 0 is log(1 + e^-2), of [0, 0] is log 2; squared errors 1 and 4
    expected = torch.tensor([2 * math.log1p(math.exp(-2)) + 1.0, 2 * math.log(2) + 4.0])
    torch.testing.assert_close(loss, expected)
