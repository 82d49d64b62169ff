"""Pretrained text encoders from Hugging Face ``transformers`` (``model.text_encoder.kind: hf``).

Any ``AutoModel`` (BERT, RoBERTa, MiniLM, XLM-R, Chinese BERT ...) from a hub id, a local directory
or an ``s3://`` directory. Training loads the pretrained weights; scoring rebuilds the bare
architecture from the ``config.json`` stored in the checkpoint (``save_architecture``), so it needs
neither the network nor the original model directory.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor, nn

from mmray.config import StorageConfig
from mmray.data.schema import ATTENTION_MASK, INPUT_IDS, POS_IDS
from mmray.data.storage import is_s3, local_dir
from mmray.models.encoders import Encoded, keep_one_key, masked_mean, pos_embedding
from mmray.models.freeze import FrozenEvalMixin

__all__ = ["HFTextEncoder", "load_hf_model"]


def load_hf_model(name: str, storage: StorageConfig | None = None, architecture_dir: str | None = None) -> nn.Module:
    """Loads ``AutoModel`` weights from ``name`` or, given ``architecture_dir``, builds it bare.

    Args:
        name: hub id, local directory or ``s3://`` directory (``model.text_encoder.name``).
        storage: S3 endpoint/region for ``s3://`` names.
        architecture_dir: a directory with the model's ``config.json`` (from a checkpoint); when given,
            no weights are loaded (the checkpoint supplies them) and ``name`` is not read.

    Raises:
        ValueError: naming ``model.text_encoder.name`` when the model cannot be loaded.
    """
    from transformers import AutoConfig, AutoModel

    if architecture_dir is not None:
        return AutoModel.from_config(AutoConfig.from_pretrained(architecture_dir), dtype=torch.float32)
    # An s3:// directory is downloaded for the load and removed after; a hub id is not a path at all.
    source = local_dir(name, storage) if is_s3(name) else contextlib.nullcontext(os.path.expanduser(name))
    with source as local:
        try:
            # dtype pinned: transformers 5 defaults to the file's dtype, and fp16 master weights do not train.
            return AutoModel.from_pretrained(local if os.path.isdir(local) else name, dtype=torch.float32)
        except (OSError, ValueError) as e:  # missing dir / unknown hub id (offline: OSError), bad id
            raise ValueError(f"model.text_encoder.name: cannot load {name!r}: {str(e)[:300]}") from None


def _largest_module_list(model: nn.Module) -> list[nn.Module]:
    """The model's Transformer layers: its longest ``ModuleList`` (``encoder.layer`` in BERT ...)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


class HFTextEncoder(FrozenEvalMixin, nn.Module):
    """Wraps an ``AutoModel``: token states from ``last_hidden_state``, pooled by ``cls`` or ``mean``.

    Args:
        model: a transformers base model (no task head).
        pooling: ``cls`` (first token) or ``mean`` (over real tokens; sentence-transformers' choice).
        pos_vocab: POS tags (``data.text.pos_tags``); their learned embedding is added to the model's
            input (word-piece) embeddings, each sub-token with its word's tag. 0: none.
    """

    def __init__(self, model: nn.Module, pooling: str, pos_vocab: int = 0):
        super().__init__()
        if getattr(model, "pooler", None) is not None:
            # BERT-style poolers are not used (we pool last_hidden_state); unused trainable
            # parameters would make DDP fail, so drop them.
            model.pooler = None
        self.model, self.pooling = model, pooling
        self.out_dim = self.token_dim = int(model.config.hidden_size)
        self.pos = pos_embedding(pos_vocab, self.out_dim)

    def block_list(self) -> list[nn.Module]:
        return _largest_module_list(self.model)

    def save_architecture(self, directory: str) -> None:
        """Writes ``config.json`` so ``load_hf_model(architecture_dir=...)`` rebuilds this model."""
        self.model.config.save_pretrained(directory)

    def forward(self, batch: dict[str, Tensor]) -> Encoded:
        ids, mask = batch[INPUT_IDS], batch[ATTENTION_MASK].bool()
        attn = keep_one_key(mask).long()
        if self.pos is None:
            hidden = self.model(input_ids=ids, attention_mask=attn).last_hidden_state
        else:  # the model adds its own position (and token-type) embeddings to inputs_embeds
            embeds = self.model.get_input_embeddings()(ids) + self.pos(batch[POS_IDS])
            hidden = self.model(inputs_embeds=embeds, attention_mask=attn).last_hidden_state
        pooled = hidden[:, 0] if self.pooling == "cls" else masked_mean(hidden, mask)
        return Encoded(pooled, hidden, mask)
