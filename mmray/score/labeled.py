"""The scoring pool's preprocessing actor: the data layer's ``Preprocessor`` plus, for ``--evaluate``,
the labels encoded with the checkpoint's label maps.

Unlike training, a missing or unknown label does not quarantine the row: it is scored all the same
and only left out of the metrics (``LABEL_ERROR`` says why), so ``--evaluate`` never changes what gets
scored. Like ``Preprocessor``, this module never imports torch: it runs in every preprocessing actor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mmray.data import storage
from mmray.data.labels import LabelError, Task
from mmray.data.preprocess import Preprocessor, PreprocessSpec
from mmray.data.schema import ID, label_key

__all__ = ["LABEL_ERROR", "LabeledPreprocessor"]

LABEL_ERROR = "_label_error"  # --evaluate: why a row's label cannot be used ("" when it can)


class LabeledPreprocessor:
    """The data layer's ``Preprocessor`` plus, for ``label_tasks``, each label encoded as in training.

    With no label tasks it is exactly ``Preprocessor``: scoring has one code path with or without
    ``--evaluate``. ``preprocessor_kwargs`` go to ``Preprocessor`` (fetch threads, attempts).
    """

    def __init__(
        self,
        spec: PreprocessSpec,
        tokenizer_files: dict[str, bytes],
        label_tasks: Sequence[Task] = (),
        **preprocessor_kwargs: Any,
    ):
        self.preprocess = Preprocessor(spec, tokenizer_files, **preprocessor_kwargs)
        self.tasks = tuple(label_tasks)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.preprocess(batch)
        if not self.tasks:
            return out
        n = len(out[ID])
        errors = np.full(n, "", dtype=object)
        for t in self.tasks:
            column = np.empty(n, dtype=object)
            for i, raw in enumerate(batch[t.name]):
                try:
                    value = t.encode(raw)  # numpy scalars/arrays from Ray encode like Python values
                except LabelError as e:
                    value = t.empty_target()  # keeps the column typed; the row is excluded by LABEL_ERROR
                    errors[i] = errors[i] or storage.redact(str(e))
                column[i] = value.tolist() if isinstance(value, np.ndarray) else value
            out[label_key(t.name)] = column
        out[LABEL_ERROR] = errors
        return out
