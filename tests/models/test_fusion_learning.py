"""Fusions must learn a cross-modal *interaction*, not only add up what each modality says alone.

The set is an XOR of modalities: the label is 1 when the caption's key word is ``A`` and the image is
red, or the word is ``B`` and the image is blue. Each modality alone is exactly at chance, so only a
fusion that combines them can fit it. Built through the real builder and optimiser, a few hundred
steps on the CPU; ``late`` fusion (a weighted average of per-modality logits) cannot represent an
interaction by construction, and the test pins that too, as the README states.

Each trained model then goes through what scoring does with it: saved as a checkpoint, rebuilt from
the checkpoint alone, and measured with the modality ablations of ``mmray ablate``: on an XOR each
modality alone is worth nothing, so the full model must beat both by a wide margin. (The real CLI
trains, scores and evaluates ``concat`` and ``cross_attention`` in tests/test_fusions_e2e.py.)
"""

from __future__ import annotations

import functools

import pytest
import torch

from mmray.checkpoint import CheckpointInfo, load_model, save_checkpoint
from mmray.config import ImageConfig, ImageEncoderConfig, ModelConfig, TextConfig, TextEncoderConfig, TrainConfig
from mmray.data.labels import Task
from mmray.data.preprocess import PreprocessSpec
from mmray.data.schema import ATTENTION_MASK, IMAGE, INPUT_IDS, MODALITIES, PIXELS, TEXT, label_key, mask_key
from mmray.models.builder import build_model
from mmray.score.ablation import variant_masks
from mmray.train import optim
from mmray.train.loop import compute_loss
from tests.models.conftest import FUSION_NAMES

ROWS, LENGTH, SIZE, VOCAB = 256, 8, 16, 16
WORD_A, WORD_B = 3, 4  # ids 5..15 are filler words
TASK = Task("label", "multiclass", ("0", "1"))


def xor_set(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    word = torch.randint(0, 2, (ROWS,), generator=g)
    red = torch.randint(0, 2, (ROWS,), generator=g)
    ids = torch.randint(5, VOCAB, (ROWS, LENGTH), generator=g)
    ids[torch.arange(ROWS), torch.randint(1, LENGTH, (ROWS,), generator=g)] = torch.where(word == 1, WORD_A, WORD_B)
    ids[:, 0] = 2  # a [CLS]-like first token
    colour = torch.where(red.view(-1, 1) == 1, torch.tensor([200, 40, 40]), torch.tensor([40, 60, 200]))
    noise = torch.randint(-30, 31, (ROWS, 3, SIZE, SIZE), generator=g)
    pixels = (colour.view(ROWS, 3, 1, 1) + noise).clamp(0, 255).to(torch.uint8)
    return {
        INPUT_IDS: ids,
        ATTENTION_MASK: torch.ones(ROWS, LENGTH, dtype=torch.long),
        PIXELS: pixels,
        mask_key(TEXT): torch.ones(ROWS),
        mask_key(IMAGE): torch.ones(ROWS),
        label_key(TASK.name): (word == red).long(),
    }


@functools.cache
def fit(fusion: str, steps: int = 300, seed: int = 0) -> tuple[torch.nn.Module, ModelConfig]:
    """Trains the default recipe's model shape at a tiny width (once per fusion in this module)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        fusion=fusion,
        hidden_dim=32,
        dropout=0.0,
        aux_loss_weight=0.0,
        fusion_heads=2,
        text_encoder=TextEncoderConfig(dim=16, heads=2),
        image_encoder=ImageEncoderConfig(dim=16),
    )
    model = build_model(cfg, TextConfig(max_length=LENGTH), ImageConfig(size=SIZE), [TASK], VOCAB)
    train = TrainConfig(lr=3e-3, warmup_fraction=0.05)
    optimizer = optim.build_optimizer(model, train)
    scheduler = optim.build_scheduler(optimizer, steps, train.warmup_fraction)
    data = xor_set(seed)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, ROWS, (32,), generator=g)
        batch = {k: v[rows] for k, v in data.items()}
        loss, _ = compute_loss(model(batch), batch, [TASK], {}, 0.0)
        loss.backward()
        optim.optimizer_step(model, optimizer, scheduler, None, train.grad_clip)
    return model.eval(), cfg


def accuracy(model: torch.nn.Module, masked: str = "full") -> float:
    """Accuracy on a held-out set (on the training set an encoder could memorise rows by their filler
    words, so even ``late`` fits it), with the modality masks of the ablation ``masked``."""
    held_out = xor_set(1000)
    masks = variant_masks({m: held_out[mask_key(m)] for m in MODALITIES}, masked)
    batch = {**held_out, **{mask_key(m): v for m, v in masks.items()}}
    with torch.no_grad():
        predicted = model(batch)["logits"][TASK.name].argmax(-1)
    return (predicted == held_out[label_key(TASK.name)]).float().mean().item()


@pytest.mark.parametrize("fusion", [f for f in FUSION_NAMES if f != "late"])
def test_fusion_learns_an_interaction_of_modalities(fusion):
    assert accuracy(fit(fusion)[0]) >= 0.95


def test_late_fusion_cannot_represent_an_interaction():
    # A weighted average of per-modality logits is additive in the modalities: XOR stays near chance.
    assert accuracy(fit("late")[0]) <= 0.8


@pytest.mark.parametrize("fusion", FUSION_NAMES)
def test_rebuilt_from_its_checkpoint_the_model_beats_both_single_modality_ablations(fusion, tmp_path):
    model, cfg = fit(fusion)
    spec = PreprocessSpec(tasks=(TASK,), text=TextConfig(max_length=LENGTH), image=ImageConfig(size=SIZE))
    save_checkpoint(tmp_path / "ckpt", model, CheckpointInfo(cfg, spec.to_dict(), (TASK,), VOCAB, 0, {}), {})
    rebuilt = load_model(tmp_path / "ckpt")
    held_out = xor_set(1000)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(held_out)["logits"], model(held_out)["logits"])
    if fusion == "late":
        return  # it cannot fit the interaction (above), so there is nothing for the ablations to lose
    full, ablated = accuracy(rebuilt), [accuracy(rebuilt, v) for v in ("text_masked", "image_masked")]
    assert full >= 0.95 and max(ablated) <= 0.7, (full, ablated)  # alone, each modality is at chance
