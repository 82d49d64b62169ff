"""``model.init_from``: start a run from another run's encoders and alignment (e.g. ``mmray pretrain``'s).

Only the parts that do not depend on the labels move: the encoders and the alignment projection with
its learned temperature. The fusion, the task heads and the matching head start fresh, since the new
run's tasks decide their shapes and meaning. The parts taken must have the same shapes, so their
settings must equal the checkpoint's: ``check_compatible`` says which keys differ on the driver, before
any data pass; ``load_parts`` copies the weights on each worker before DDP broadcasts rank 0's.
"""

from __future__ import annotations

import os

from safetensors.torch import load_file
from torch import nn

from mmray.checkpoint import WEIGHTS_FILE, CheckpointInfo
from mmray.config import Config, config_to_dict, flatten

__all__ = ["PARTS", "check_compatible", "load_parts"]

PARTS = ("encoders.", "align.")  # state-dict prefixes taken from the checkpoint
# Settings that decide the taken parts' shapes; `freeze` only decides what trains, so it may differ.
_SHAPING = ("text_encoder", "image_encoder")


def check_compatible(cfg: Config, info: CheckpointInfo, uri: str) -> None:
    """Refuses a checkpoint whose encoders or alignment were built with other settings than this run's.

    Raises:
        ValueError: naming every differing key with both values.
    """
    mine, theirs = config_to_dict(cfg.model), config_to_dict(info.model)
    differing = []
    for part in _SHAPING:
        a, b = flatten(mine[part], f"model.{part}"), flatten(theirs[part], f"model.{part}")
        differing += [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if not k.endswith(".freeze")]
    differing = [d for d in differing if d[1] != d[2]]
    if cfg.model.align.weight > 0 and info.model.align.weight > 0:
        a, b = cfg.model.align.projection_dim, info.model.align.projection_dim
        if a != b:
            differing.append(("model.align.projection_dim", a, b))
    if differing:
        shown = "; ".join(f"{k}: {a!r} here, {b!r} in the checkpoint" for k, a, b in differing)
        raise ValueError(f"model.init_from: {uri} was trained with other encoder settings ({shown})")


def load_parts(model: nn.Module, directory: str | os.PathLike, uri: str) -> list[str]:
    """Copies the checkpoint's encoder and alignment weights into ``model`` (a bare ``FusionClassifier``).

    The alignment is taken when both have one; a run without alignment takes only the encoders.

    Returns:
        The state-dict names loaded.

    Raises:
        ValueError: a part of ``model`` that the checkpoint lacks or holds in another shape, named.
    """
    state = load_file(os.path.join(directory, WEIGHTS_FILE))
    own = {k: v for k, v in model.state_dict().items() if k.startswith(PARTS)}
    if not any(k.startswith("align.") for k in state):
        own = {k: v for k, v in own.items() if not k.startswith("align.")}
    missing = sorted(k for k in own if k not in state)
    reshaped = sorted(k for k in own if k in state and state[k].shape != own[k].shape)
    if missing or reshaped:
        what = [f"missing {', '.join(missing[:3])}"] if missing else []
        what += [f"other shapes for {', '.join(reshaped[:3])}"] if reshaped else []
        raise ValueError(f"model.init_from: {uri} does not fit this model ({'; '.join(what)})")
    model.load_state_dict({k: state[k] for k in own}, strict=False)
    return sorted(own)
