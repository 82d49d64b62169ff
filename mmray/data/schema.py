"""Names shared by the data code and the models: modality keys and preprocessed column names.

The modality keys are defined here once; encoders, fusions and the preprocessing actors all use them.
A preprocessed batch is a dict of numpy arrays / tensors with these keys.
"""

from __future__ import annotations

import pyarrow as pa

__all__ = [
    "ATTENTION_MASK", "ERROR", "ERROR_COLUMN", "ERROR_STAGE", "ID", "IMAGE", "INPUT_IDS", "MODALITIES",
    "PIXELS", "QUARANTINE_SCHEMA", "SchemaError", "TEXT", "check_columns", "label_key", "mask_key",
    "task_of_label_key",
]  # fmt: skip

TEXT = "text"
IMAGE = "image"
MODALITIES = (IMAGE, TEXT)  # sorted: fusions iterate modalities in this order

ID = "id"
INPUT_IDS = "input_ids"  # int64 [B, L]
ATTENTION_MASK = "attention_mask"  # int64 [B, L]
PIXELS = "pixels"  # uint8 [B, 3, S, S]; normalised on the training/scoring device
ERROR = "_error"  # "" for a good row, else a short reason
ERROR_COLUMN = "_error_column"  # the input column that caused it
ERROR_STAGE = "_error_stage"  # preprocess | predict | label

_LABEL_PREFIX = "label__"
_MASK_PREFIX = "mask__"

QUARANTINE_SCHEMA = pa.schema(
    [("id", pa.string()), ("stage", pa.string()), ("column", pa.string()), ("error", pa.string())]
)


class SchemaError(ValueError):
    """An input dataset lacks a column or has it with the wrong type."""


def label_key(task: str) -> str:
    return f"{_LABEL_PREFIX}{task}"


def task_of_label_key(key: str) -> str | None:
    return key[len(_LABEL_PREFIX) :] if key.startswith(_LABEL_PREFIX) else None


def mask_key(modality: str) -> str:
    """Column holding 1.0 where the row has that modality, 0.0 where it is missing."""
    return f"{_MASK_PREFIX}{modality}"


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def check_columns(schema: pa.Schema, expected: dict[str, str], source: str) -> None:
    """Fails fast when a column is missing or mistyped.

    Args:
        schema: the dataset's Arrow schema.
        expected: column -> one of "string", "binary", "label", "any".
        source: the file or URI, named in the error.

    Raises:
        SchemaError: naming the column, the expected type and the source.
    """
    checks = {
        "string": _is_string,
        "binary": _is_binary,
        "label": lambda t: _is_string(t) or pa.types.is_integer(t) or pa.types.is_boolean(t)
        or pa.types.is_floating(t) or pa.types.is_list(t) or pa.types.is_large_list(t),
        "any": lambda t: True,
    }  # fmt: skip
    for column, kind in expected.items():
        if column not in schema.names:
            raise SchemaError(
                f"column '{column}' is missing in {source} (expected {kind}; found {schema.names})"
            )
        actual = schema.field(column).type
        if not checks[kind](actual):
            raise SchemaError(f"column '{column}' in {source} has type {actual}, expected {kind}")
