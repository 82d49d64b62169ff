"""``data.cache=features``: frozen encoders run once, in an actor pool after preprocessing.

With both encoders frozen (``freeze: true``; the config refuses anything that would change their
outputs between epochs) a row's encoder outputs never change, so computing them every epoch is
waste: a ResNet or a MiniLM costs far more than the fusion and heads trained on what it outputs.
``encode_splits`` maps each cached, preprocessed split through a pool of ``FeatureEncoder`` actors
(sized by ``data.preprocess``) and keeps the result in the object store instead: per row, what the
fusion reads from each encoder (``feature_columns``: the pooled vectors, and the tokens with their
mask for a fusion that reads them), the modality masks, the labels and the token ids (the alignment
losses tell captions apart by them). The pixels are released once every split is encoded.

The encoders' weights are those of the model the workers start from (``initial_model``: the seed,
``model.init_from``) or, resuming, ``train.resume_from``'s: the features are those of the encoders
every checkpoint holds. The workers train ``FusionClassifier.with_cached_features()`` and checkpoint
the whole model, so ``mmray score`` and ``mmray embed`` run it unchanged on raw rows.
"""

from __future__ import annotations

import os

import numpy as np
import ray
import ray.data
import torch
from safetensors.torch import load_file
from torch import nn

from mmray.checkpoint import WEIGHTS_FILE
from mmray.config import Config
from mmray.console import say
from mmray.data import pipeline, storage
from mmray.data.labels import Task
from mmray.data.schema import ATTENTION_MASK, MODEL_INPUTS, PIXELS, POS_IDS
from mmray.models.encoders import feature_columns
from mmray.train.ingest import ordered_blocks
from mmray.train.loop import initial_model

__all__ = ["FeatureEncoder", "encode_splits", "feature_model"]

# The encoders' inputs, replaced by their outputs; the token ids stay (they identify a caption).
_ENCODED = (PIXELS, ATTENTION_MASK, POS_IDS)


class FeatureEncoder:
    """Actor: preprocessed rows -> the same rows with the encoders' outputs instead of their inputs.

    Args:
        model: the ``FusionClassifier`` whose encoders run, in eval mode (frozen encoders stay in eval
            mode while training too), on the CPU; or an ObjectRef to it, as ``encode_splits`` passes it
            (a pretrained model is too large to travel inside every actor's constructor arguments).
    """

    def __init__(self, model: nn.Module | ray.ObjectRef):
        model = ray.get(model) if isinstance(model, ray.ObjectRef) else model
        self.model = model.eval()
        self.tokens = getattr(model.fusion, "reads_tokens", False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = {k: torch.from_numpy(np.ascontiguousarray(batch[k])) for k in MODEL_INPUTS if k in batch}
        with torch.no_grad():
            features = self.model.encode(inputs)
        out = {k: v for k, v in batch.items() if k not in _ENCODED}
        out.update({k: v.numpy() for k, v in feature_columns(features, self.tokens).items()})
        return out


def feature_model(cfg: Config, tasks: list[Task], vocab_size: int) -> nn.Module:
    """The model whose encoders compute the features: the workers' starting model, with
    ``train.resume_from``'s encoder weights when resuming (the workers load them from there)."""
    model = initial_model(cfg, tasks, vocab_size)
    if cfg.train.resume_from:
        with storage.local_dir(cfg.train.resume_from, cfg.storage) as local:
            state = load_file(os.path.join(local, WEIGHTS_FILE))
        model.load_state_dict({k: v for k, v in state.items() if k.startswith("encoders.")}, strict=False)
    return model


def encode_splits(
    cfg: Config, tasks: list[Task], vocab_size: int, datasets: dict[str, ray.data.Dataset]
) -> dict[str, ray.data.Dataset]:
    """Each split's rows with the frozen encoders' outputs (``FeatureEncoder``), in the object store.

    Args:
        datasets: split name -> its cached, usable preprocessed rows (``ingest.prepare_datasets``).
    """
    model = ray.put(feature_model(cfg, tasks, vocab_size))
    pcfg = cfg.data.preprocess
    say(f"data.cache=features: encoding {', '.join(datasets)} once with the frozen encoders")
    with ordered_blocks():
        return {
            name: pipeline.map_with_actors(
                ds, FeatureEncoder, (model,), pcfg.batch_size, pcfg.concurrency, pcfg.num_cpus
            ).materialize()
            for name, ds in datasets.items()
        }
