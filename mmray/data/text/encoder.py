"""A saved tokenizer, loaded and run: ``load_tokenizer`` (``transformers``, on the driver) and
``read_tokenizer_dir`` + ``TokenEncoder`` (the Rust ``tokenizers`` library alone, in the actors).

The tokenizer is a pretrained one (``AutoTokenizer``: an HF hub id, a local or ``s3://`` directory)
or the CJK-aware WordPiece of ``wordpiece.train_wordpiece``; either is saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
import os
from bisect import bisect_right
from pathlib import Path

import numpy as np

from mmray.config import StorageConfig

__all__ = ["TokenEncoder", "load_tokenizer", "read_tokenizer_dir"]


def read_tokenizer_dir(directory: str | Path) -> dict[str, bytes]:
    """A saved tokenizer's files (``save_pretrained`` output) as name -> bytes: the form actors receive
    (shipped by value, so no node needs shared storage) and ``TokenEncoder`` takes."""
    return {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}


class TokenEncoder:
    """A saved tokenizer's ``tokenizer.json`` run directly by the Rust ``tokenizers`` library: token ids
    and attention masks padded and truncated to ``max_length``.

    This is the backend a ``transformers`` fast tokenizer calls, with its special tokens, padding and
    truncation sides, so the ids are the same (tested against ``transformers``); preprocessing actors
    use it because importing ``transformers`` pulls in torch (~6 CPU-s and ~0.7 GB per actor).

    Args:
        files: file name -> bytes of a directory written by ``save_pretrained`` (a checkpoint's
            ``tokenizer/``); it must hold ``tokenizer.json`` (every fast tokenizer writes one).

    Raises:
        ValueError: no ``tokenizer.json``, or no pad token to pad with.
    """

    def __init__(self, files: dict[str, bytes], max_length: int):
        from tokenizers import Tokenizer

        if "tokenizer.json" not in files:
            raise ValueError(f"tokenizer has no tokenizer.json (files: {sorted(files)}); save a fast tokenizer")
        self.backend = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        self.max_length = max_length
        config = json.loads(files.get("tokenizer_config.json", b"{}"))
        pad = config.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        pad_id = self.backend.token_to_id(pad) if pad else None
        if pad_id is None:
            raise ValueError(f"tokenizer has no pad token in its vocabulary (pad_token: {pad!r})")
        self.backend.enable_truncation(max_length, direction=config.get("truncation_side", "right"))
        self.backend.enable_padding(
            direction=config.get("padding_side", "right"), pad_id=pad_id, pad_token=pad, length=max_length
        )

    @property
    def vocab_size(self) -> int:
        """Ids the model's embedding must hold: the vocabulary plus added (special) tokens."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """int64 ``[N, max_length]`` token ids and attention mask."""
        ids, mask, _ = self.encode(texts)
        return ids, mask

    def encode(
        self,
        texts: list[str],
        spans: list[list[tuple[int, int, int]]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Token ids, attention mask and, given each text's ``PosTagger`` spans, int64 POS ids aligned
        with the tokens: a (sub-)token takes the tag of the word its first character is in; special
        tokens, padding and untagged characters get 0."""
        encodings = self.backend.encode_batch(texts)
        shape = (len(texts), self.max_length)
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(shape)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(shape)
        if spans is None:
            return ids, mask, None
        pos = np.zeros(shape, dtype=np.int64)
        for i, (e, row) in enumerate(zip(encodings, spans)):
            starts = [a for a, _, _ in row]
            for j, ((a, b), special) in enumerate(zip(e.offsets, e.special_tokens_mask)):
                k = bisect_right(starts, a) - 1
                if not special and b > a and k >= 0 and a < row[k][1]:
                    pos[i, j] = row[k][2]
        return ids, mask, pos


def load_tokenizer(name_or_dir: str | Path, storage: StorageConfig | None = None):
    """Loads a tokenizer from an HF hub id (or its local cache), a local directory or an ``s3://`` directory.

    Raises:
        FileNotFoundError: a local or S3 directory that does not exist.
        ValueError: anything else that cannot be loaded, naming the source.
    """
    from mmray.data.storage import is_s3, local_dir

    name = str(name_or_dir)
    if is_s3(name):
        with local_dir(name, storage) as local:
            return _from_pretrained(local, shown=name)
    path = os.path.expanduser(name.removeprefix("file://"))
    if name.startswith(("/", "./", "../", "~", "file://")) and not os.path.isdir(path):
        raise FileNotFoundError(f"no tokenizer directory at {name}")
    return _from_pretrained(path, shown=name)


def _from_pretrained(path: str, shown: str):
    from transformers import AutoTokenizer

    from mmray.data.storage import redact

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # HF reports a bad id, a missing file or no network as these
        raise ValueError(f"cannot load a tokenizer from {redact(shown)}: {redact(str(e))[:300]}") from None
