"""Text as the tokenizer sees it, the same at train and score: bounded in size, NFKC, whitespace and
control characters cleaned, optionally lowercased, stopwords dropped and Chinese cut into words.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from mmray.config import StorageConfig, TextConfig
from mmray.data.text.dictionaries import load_stopwords, load_user_dict
from mmray.data.text.segment import Segmenter, shared_segmenter

__all__ = ["TextNormalizer", "TextTooLarge", "bounded_text", "has_cjk"]

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_SPACES = re.compile(r"\s+")


class TextTooLarge(ValueError):
    """A text cell above ``data.text.max_bytes``: the message names the size and the key."""


def bounded_text(raw: str, cfg: TextConfig) -> str:
    """``raw`` within the text limits, before anything that scales with it (NFKC, stopwords, the
    pre-tokenizer): cut to ``max_chars``; one above ``max_bytes`` is refused. The one rule for the
    preprocessing actor and the tokenizer's sample (a 50 MB cell once took the driver to 3.9 GB there).

    Raises:
        TextTooLarge: ``raw`` is above ``data.text.max_bytes``.
    """
    if len(raw) > cfg.max_bytes // 4:  # below that, even 4-byte characters fit: skip counting
        size = _utf8_size(raw)
        if size > cfg.max_bytes:
            raise TextTooLarge(f"text is {size} bytes, above data.text.max_bytes={cfg.max_bytes}")
    return raw[: cfg.max_chars]


def _utf8_size(text: str, chunk: int = 1 << 20) -> int:
    """UTF-8 length of ``text`` without one whole encoded copy of a huge value."""
    if text.isascii():
        return len(text)
    return sum(len(text[j : j + chunk].encode("utf-8", "surrogatepass")) for j in range(0, len(text), chunk))


class TextNormalizer:
    """NFKC, whitespace cleanup, optional lowercasing and stopword removal; the same at train and score.

    Args:
        cfg: the ``data.text`` settings.
        storage: where a user stopword file (``data.text.stopwords`` as a path or URI) is read from.
        stopwords: the resolved word list, when the caller already has it (a checkpoint stores the
            list itself, so scoring never depends on the training machine's file).
    """

    def __init__(
        self,
        cfg: TextConfig,
        storage: StorageConfig | None = None,
        stopwords: Iterable[str] | None = None,
        segmenter: Segmenter | None = None,
    ):
        self.nfkc = cfg.nfkc
        self.lowercase = cfg.lowercase
        words = load_stopwords(cfg.stopwords, storage) if stopwords is None else stopwords
        self.stopwords = frozenset(w.lower() for w in words)
        # Without a segmenter, multi-character CJK stopwords are removed by substring; longest first.
        self._cjk_stop = sorted((w for w in self.stopwords if has_cjk(w)), key=len, reverse=True)
        if cfg.segmenter == "jieba" and segmenter is None:
            segmenter = shared_segmenter(load_user_dict(cfg.user_dict, storage))
        self.segmenter = segmenter if cfg.segmenter == "jieba" else None

    def __call__(self, text: str) -> str:
        """The text the tokenizer sees; with a segmenter, its words (stopwords dropped) joined by spaces."""
        if self.nfkc:
            text = unicodedata.normalize("NFKC", text)
        if not text.isprintable():
            text = "".join(_clean_char(c) for c in text)
        if self.lowercase:
            text = text.lower()
        if self.segmenter is not None:  # whole words: "目的" (purpose) keeps its 的, "我们" goes as a word
            return " ".join(w for w in self.segmenter.words(text) if w.lower() not in self.stopwords)
        if self.stopwords:
            for w in self._cjk_stop:
                text = text.replace(w, " ")
            text = " ".join(t for t in _WORD.findall(text) if t.lower() not in self.stopwords)
        return _SPACES.sub(" ", text).strip()


def _clean_char(c: str) -> str:
    """Whitespace and control characters -> a space; format (zero-width, BOM), surrogate, private-use
    and unassigned code points -> dropped, as they carry no text and break some tokenizers."""
    if c.isprintable():
        return c
    if c.isspace() or unicodedata.category(c) == "Cc":
        return " "
    return ""


def has_cjk(s: str) -> bool:
    """Any CJK ideograph (the unified block or extension A) in ``s``."""
    return any("\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" for c in s)
