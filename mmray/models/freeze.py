"""Freezing encoders: ``freeze: true | false | N`` (N = train only the last N blocks).

Every encoder exposes ``block_list()``: its repeated units in forward order (Transformer layers, CNN
stages). ``apply_freeze`` turns off gradients for everything registered before the first trainable
block, so embeddings/stems freeze with the early blocks and final norms stay trainable with the late
ones. Frozen parts are also kept in eval mode (``FrozenEvalMixin``): a frozen backbone should neither
update BatchNorm running statistics nor apply dropout to features it is not learning.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import nn

__all__ = ["FrozenEvalMixin", "apply_freeze", "frozen_subtrees"]


def apply_freeze(module: nn.Module, blocks: Sequence[nn.Module], freeze: bool | int, key: str) -> None:
    """Freezes ``module`` in place according to ``freeze``.

    Args:
        module: the encoder.
        blocks: its repeated units in forward order (from ``module.block_list()``).
        freeze: False (train all), True or 0 (train none), N > 0 (train the last N blocks and every
            parameter registered after the first of them).
        key: the config key, named in errors (e.g. ``model.image_encoder.freeze``).

    Raises:
        ValueError: N is negative or exceeds the number of blocks.
    """
    if freeze is False:
        return
    params = list(module.parameters())
    start = len(params)
    if freeze is not True and freeze != 0:
        if freeze < 0 or freeze > len(blocks):
            raise ValueError(f"{key}: {freeze} is not between 0 and the encoder's {len(blocks)} blocks")
        first = {id(p) for p in blocks[-freeze].parameters()}
        start = next(i for i, p in enumerate(params) if id(p) in first)
    for p in params[:start]:
        p.requires_grad_(False)


def frozen_subtrees(module: nn.Module) -> Iterator[nn.Module]:
    """The largest submodules whose parameters are all frozen (modules without parameters skipped)."""
    for child in module.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            yield child
        elif params:
            yield from frozen_subtrees(child)


class FrozenEvalMixin:
    """``train(True)`` leaves frozen subtrees in eval mode (BatchNorm statistics, dropout)."""

    def train(self, mode: bool = True):
        super().train(mode)  # type: ignore[misc]
        if mode:
            for sub in frozen_subtrees(self):  # type: ignore[arg-type]
                sub.eval()
        return self
