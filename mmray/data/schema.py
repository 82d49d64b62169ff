"""Names shared by the data code and the models: modality keys and preprocessed column names.

The modality keys are defined here once; encoders, fusions and the preprocessing actors all use them.
A preprocessed batch is a dict of numpy arrays / tensors with these keys.
"""

from __future__ import annotations

import difflib

import pyarrow as pa

__all__ = [
    "POS_TAGS",
    "ATTENTION_MASK",
    "ERROR",
    "ERROR_COLUMN",
    "ERROR_STAGE",
    "ID",
    "IMAGE",
    "INPUT_IDS",
    "MODALITIES",
    "MODEL_INPUTS",
    "PIXELS",
    "POS_IDS",
    "QUARANTINE_SCHEMA",
    "ROW",
    "SchemaError",
    "TEXT",
    "check_columns",
    "label_key",
    "mask_key",
    "task_of_label_key",
    "unify_columns",
]

TEXT = "text"
IMAGE = "image"
MODALITIES = (IMAGE, TEXT)  # sorted: fusions iterate modalities in this order

ID = "id"
INPUT_IDS = "input_ids"  # int64 [B, L]
ATTENTION_MASK = "attention_mask"  # int64 [B, L]
POS_IDS = "pos_ids"  # int64 [B, L], only with data.text.pos_tags: a POS tag id per token (POS_TAGS)
PIXELS = "pixels"  # uint8 [B, 3, S, S]; normalised on the training/scoring device
ERROR = "_error"  # "" for a good row, else a short reason
ERROR_COLUMN = "_error_column"  # the input column that caused it
ERROR_STAGE = "_error_stage"  # preprocess | predict | label
# int64: the row's position in the input (files in listing order, rows in file order, from 0). Scoring
# reads its own slices and so knows it; ``--retry-quarantined`` finds rows by it, whatever their ids.
ROW = "_row"

_LABEL_PREFIX = "label__"
_MASK_PREFIX = "mask__"

# ``row`` is ``ROW``: set by scoring, null where the reader does not track positions (training).
QUARANTINE_SCHEMA = pa.schema(
    [("id", pa.string()), ("stage", pa.string()), ("column", pa.string()), ("error", pa.string()), ("row", pa.int64())]
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


# What a model reads from a preprocessed batch (scoring and evaluation pass exactly these on).
MODEL_INPUTS = (INPUT_IDS, ATTENTION_MASK, POS_IDS, PIXELS, mask_key(IMAGE), mask_key(TEXT))


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t) or pa.types.is_null(t)


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t) or pa.types.is_null(t)


def _is_label(t: pa.DataType) -> bool:
    return (
        _is_string(t)
        or pa.types.is_integer(t)
        or pa.types.is_boolean(t)
        or pa.types.is_floating(t)
        or pa.types.is_list(t)
        or pa.types.is_large_list(t)
    )


# kind -> (check, what the error message says was expected). An all-null column (Arrow type null, as
# pandas writes a column with no values) passes: its rows are missing a modality or a label, which is
# a row-level problem for the quarantine, not a schema error.
_KINDS = {
    "string": (_is_string, "string"),
    "binary": (_is_binary, "binary (encoded image bytes)"),
    "label": (_is_label, "string, integer, boolean, floating point or list"),
    "any": (lambda t: True, "any type"),
}


def check_columns(schema: pa.Schema, expected: dict[str, str], source: str) -> None:
    """Fails fast when a column is missing or mistyped.

    Args:
        schema: the dataset's Arrow schema.
        expected: column -> one of "string", "binary", "label", "any".
        source: the file or URI, named in the error.

    Raises:
        SchemaError: naming the column, the expected type and the source.
    """
    for column, kind in expected.items():
        check, wanted = _KINDS[kind]
        if column not in schema.names:
            close = difflib.get_close_matches(column, schema.names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise SchemaError(
                f"column '{column}' is missing in {source} (expected {wanted}; found {schema.names}){hint}"
            )
        actual = schema.field(column).type
        if not check(actual):
            raise SchemaError(f"column '{column}' in {source} has type {actual}, expected {wanted}")


def unify_columns(schemas: dict[str, pa.Schema], expected: dict[str, str]) -> pa.Schema | None:
    """One read schema for files whose individually valid types differ, or None when they agree.

    Per column: types that Arrow promotes losslessly (int32/int64, string/large_string, null/any) are
    promoted; scalar ids, labels and text that still disagree (int64 in one file, string in another)
    are read as strings, which is what preprocessing makes of them anyway (``1`` and ``"1"`` are one
    id, one label). Anything else (a list in one file, a scalar in another) is an error.

    Args:
        schemas: source (file or URI, as shown to users) -> its schema, each already ``check_columns``-ed.
        expected: column -> kind, as for ``check_columns``.

    Raises:
        SchemaError: naming the column and the first two files whose types cannot be unified.
    """
    fields, differ = [], False
    for column, kind in expected.items():
        seen = {src: s.field(column).type for src, s in schemas.items() if column in s.names}
        types = {t for t in seen.values() if not pa.types.is_null(t)}
        differ |= len(types) > 1
        try:
            unified = (
                pa.unify_schemas([pa.schema([(column, t)]) for t in seen.values()], promote_options="permissive")
                .field(column)
                .type
            )
        except (pa.ArrowTypeError, pa.ArrowInvalid):
            if any(pa.types.is_nested(t) for t in types) or kind == "binary":
                first, second = _disagreeing(seen)
                raise SchemaError(
                    f"column '{column}' is {seen[first]} in {first} but {seen[second]} in {second}; "
                    "make the files agree"
                ) from None
            unified = pa.string()
        fields.append(pa.field(column, unified))
    return pa.schema(fields) if differ else None


def _disagreeing(seen: dict[str, pa.DataType]) -> tuple[str, str]:
    sources = [src for src, t in seen.items() if not pa.types.is_null(t)]
    first = sources[0]
    return first, next(src for src in sources if seen[src] != seen[first])


# Universal POS (universaldependencies.org/u/pos): one tag set for jieba's and spaCy's tags, fixed here so
# a checkpoint's POS embedding rows keep their meaning. Id 0: special tokens, padding, untagged text.
POS_TAGS = (
    "[NONE]",
    "ADJ",
    "ADP",
    "ADV",
    "AUX",
    "CCONJ",
    "DET",
    "INTJ",
    "NOUN",
    "NUM",
    "PART",
    "PRON",
    "PROPN",
    "PUNCT",
    "SCONJ",
    "SYM",
    "VERB",
    "X",
)
