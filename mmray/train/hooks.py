"""``train.before_step``: a user function every training worker calls before each optimizer step.

The config names it as ``"package.module:function"`` (checked for shape where the config is loaded);
here it is imported. The driver imports it once before the trainer starts, so a typo fails in
seconds rather than after the workers have started; each worker imports it again, where it runs.
Profilers, custom logging and fault drills plug in this way without the loop knowing about them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from mmray.config import ConfigError

__all__ = ["BeforeStep", "load_before_step"]

BeforeStep = Callable[[int, int, int], None]  # fn(rank, epoch, step): step is 0-based within the epoch


def load_before_step(spec: str | None) -> BeforeStep | None:
    """The function ``spec`` names (None when unset).

    Raises:
        ConfigError: the module cannot be imported or has no such callable; the message names
            ``train.before_step`` and the module.
    """
    if spec is None:
        return None
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # not found, or its own import failed: either way the key is what to fix
        raise ConfigError(f"train.before_step: cannot import module {module_name!r}: {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"train.before_step: module {module_name!r} has no function {attr!r}")
    return fn
