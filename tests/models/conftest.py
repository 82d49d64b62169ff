"""Model-test fixtures: deterministic tiny batches and encoders (no Ray, no network)."""

from __future__ import annotations

import typing

import pytest
import torch

from mmray.config import ModelConfig
from mmray.data.schema import ATTENTION_MASK, IMAGE, INPUT_IDS, PIXELS, TEXT, mask_key

# Every fusion the config accepts (``model.fusion``), so a new one is covered by the shared tests.
FUSION_NAMES = sorted(typing.get_args(typing.get_type_hints(ModelConfig)["fusion"]))


def make_batch(b: int = 6, length: int = 8, size: int = 16, vocab: int = 50, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids with some padding, uint8 pixels, and rows 1 (no text) and 2 (no image) missing a modality."""
    g = torch.Generator().manual_seed(seed)
    attn = torch.ones(b, length, dtype=torch.long)
    attn[0, length // 2 :] = 0
    ids = torch.randint(1, vocab, (b, length), generator=g) * attn
    text_mask, image_mask = torch.ones(b), torch.ones(b)
    text_mask[1], image_mask[2] = 0.0, 0.0
    return {
        INPUT_IDS: ids,
        ATTENTION_MASK: attn,
        PIXELS: torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8),
        mask_key(TEXT): text_mask,
        mask_key(IMAGE): image_mask,
    }


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return make_batch()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    """A randomly initialised 2-layer BERT saved like a hub model (config.json + safetensors)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    path = tmp_path_factory.mktemp("tiny_bert")
    BertModel(cfg).save_pretrained(path)
    return str(path)
