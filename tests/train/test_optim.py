"""Learning-rate schedule, parameter groups, precision and the optimizer step, on toy models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmray.config import TrainConfig
from mmray.train import optim


class Toy(nn.Module):
    """Same naming as FusionClassifier: encoders under ``encoders.``, the rest outside."""

    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict({"text": nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))})
        self.head = nn.Linear(4, 2)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.head(self.encoders["text"](x))


def test_lr_warms_up_linearly_then_decays_to_zero_by_cosine():
    fn = optim.lr_lambda(total_steps=100, warmup_fraction=0.1)  # 10 warm-up steps
    assert [fn(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert fn(10) == pytest.approx(1.0)
    assert fn(55) == pytest.approx(0.5)  # halfway through the 90 decay steps: cos(pi/2)
    assert fn(100) == pytest.approx(0.0, abs=1e-12)
    assert fn(500) == pytest.approx(0.0, abs=1e-12)  # clamped after the end
    decay = [fn(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_scheduler_drives_each_group_from_its_base_rate():
    model = Toy()
    opt = optim.build_optimizer(model, TrainConfig(lr=1e-2, encoder_lr=1e-4, warmup_fraction=0.5, batch_size=64))
    sched = optim.build_scheduler(opt, total_steps=4, warmup_fraction=0.5)
    rates = {g["name"]: g["lr"] for g in opt.param_groups}
    assert rates == pytest.approx({"encoder": 0.5e-4, "head": 0.5e-2})  # step 0 of 2 warm-up steps
    opt.step()
    sched.step()
    assert {g["name"]: g["lr"] for g in opt.param_groups} == pytest.approx({"encoder": 1e-4, "head": 1e-2})


@pytest.mark.parametrize(("rule", "factor"), [("none", 1.0), ("sqrt", 2.0), ("linear", 4.0)])
def test_rates_follow_the_global_batch_by_the_configured_rule(rule, factor):
    # 32 rows x 2 workers x 4 accumulated batches = 256 rows = 4x the reference batch of 64.
    t = TrainConfig(lr=1e-3, encoder_lr=1e-4, batch_size=32, grad_accum_steps=4, lr_scaling=rule)
    assert optim.lr_scale(t, world_size=2) == pytest.approx(factor)
    rates = {g["name"]: g["lr"] for g in optim.build_optimizer(Toy(), t, world_size=2).param_groups}
    assert rates == pytest.approx({"encoder": 1e-4 * factor, "head": 1e-3 * factor})


def test_param_groups_split_encoder_head_and_decay():
    model = Toy()
    groups = optim.param_groups(model, lr=1e-3, encoder_lr=None, weight_decay=0.05)
    by_key = {(g["name"], g["weight_decay"]): g for g in groups}
    enc_w, enc_nd = by_key[("encoder", 0.05)], by_key[("encoder", 0.0)]
    head_w, head_nd = by_key[("head", 0.05)], by_key[("head", 0.0)]
    text = model.encoders["text"]
    assert {id(p) for p in enc_w["params"]} == {id(text[0].weight)}
    assert {id(p) for p in enc_nd["params"]} == {id(text[0].bias), id(text[1].weight), id(text[1].bias)}
    assert {id(p) for p in head_w["params"]} == {id(model.head.weight)}
    assert {id(p) for p in head_nd["params"]} == {id(model.head.bias)}
    assert all(g["lr"] == 1e-3 for g in groups)  # encoder_lr None = lr
    grouped = {id(p) for g in groups for p in g["params"]}
    assert id(model.frozen.weight) not in grouped and id(model.frozen.bias) not in grouped


def test_param_groups_see_through_a_ddp_style_wrapper():
    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    groups = optim.param_groups(Wrapper(Toy()), lr=1e-3, encoder_lr=1e-5, weight_decay=0.0)
    assert {g["name"]: g["lr"] for g in groups} == {"encoder": 1e-5, "head": 1e-3}


def test_steps_per_epoch_matches_equal_split_and_partial_windows():
    # 101 rows over 2 workers: 50 each (equal split drops 1) -> 4 batches of 16 -> 2 windows of 3.
    assert optim.steps_per_epoch(101, 2, 16, 3) == 2
    assert optim.steps_per_epoch(64, 1, 16, 1) == 4
    assert optim.steps_per_epoch(1, 4, 16, 1) == 1  # never 0: the schedule needs a length


def test_precision_auto_is_fp32_on_cpu_bf16_on_gpu():
    assert optim.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert optim.resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    assert optim.resolve_precision("fp16", torch.device("cpu")) == "fp16"
    assert optim.make_scaler("bf16", torch.device("cpu")) is None
    assert isinstance(optim.make_scaler("fp16", torch.device("cpu")), torch.amp.GradScaler)


@pytest.mark.parametrize(
    "precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]
)
def test_autocast_runs_matmuls_in_the_requested_dtype(precision, dtype):
    a = torch.randn(4, 4)
    with optim.autocast(precision, torch.device("cpu")):
        assert (a @ a).dtype == dtype


def test_optimizer_step_clips_the_gradient_norm(seed):
    model = nn.Linear(3, 1, bias=False)
    model.weight.data.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model.weight.grad = torch.tensor([[3.0, 4.0, 0.0]])  # norm 5
    norm = optim.optimizer_step(model, opt, sched, None, grad_clip=1.0)
    assert float(norm) == pytest.approx(5.0)
    assert model.weight.data[0].tolist() == pytest.approx([-0.6, -0.8, 0.0])  # the unit-norm step
    assert model.weight.grad is None and sched.last_epoch == 1


def test_fp16_scaler_step_unscales_before_clipping(seed):
    model = nn.Linear(2, 1, bias=False)
    model.weight.data.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    loss = (model(torch.tensor([[1.0, 0.0]])) - 2.0).pow(2).sum()  # d/dw0 = -4 at w = 0
    scaler.scale(loss).backward()
    norm = optim.optimizer_step(model, opt, sched, scaler, grad_clip=10.0)
    assert float(norm) == pytest.approx(4.0)  # the true norm, not 1024x it
    assert model.weight.data[0].tolist() == pytest.approx([4.0, 0.0])


def test_cosine_tail_value():
    fn = optim.lr_lambda(total_steps=10, warmup_fraction=0.0)  # warm-up is at least 1 step
    assert fn(0) == 1.0
    assert fn(5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 9)))
