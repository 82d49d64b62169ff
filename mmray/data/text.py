"""Text normalisation and tokenizers (pretrained via ``AutoTokenizer`` or a CJK-aware WordPiece).

Whitespace tokenizers fail on Chinese, which has no spaces. The WordPiece built here uses the BERT
pre-tokenizer, which isolates every CJK character, so Chinese, mixed-script and emoji text get real ids.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mmray.config import StorageConfig, TextConfig

__all__ = [
    "TextNormalizer", "TokenEncoder", "load_stopwords", "load_tokenizer", "read_tokenizer_dir", "train_wordpiece",
    "wordpiece_vocab",
]  # fmt: skip

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MAX_WORD_CHARS = 100  # BERT's limit: a longer "word" is [UNK]

# Short built-in lists; a user file (one word per line) replaces them via data.text.stopwords.
_STOPWORDS = {
    "en": """a an and are as at be but by for from has have he her his i in is it its of on or our she
        that the their them they this to was we were what which who will with you your""".split(),
    "zh": "的 了 和 是 在 也 就 都 而 及 与 着 或 一个 没有 我们 你们 他们 这 那 之 吗 呢 吧 啊".split(),
}
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_SPACES = re.compile(r"\s+")


class TextNormalizer:
    """NFKC, whitespace cleanup, optional lowercasing and stopword removal; the same at train and score.

    Args:
        cfg: the ``data.text`` settings.
        storage: where a user stopword file (``data.text.stopwords`` as a path or URI) is read from.
        stopwords: the resolved word list, when the caller already has it (a checkpoint stores the
            list itself, so scoring never depends on the training machine's file).
    """

    def __init__(self, cfg: TextConfig, storage: StorageConfig | None = None, stopwords: Iterable[str] | None = None):
        self.nfkc = cfg.nfkc
        self.lowercase = cfg.lowercase
        words = load_stopwords(cfg.stopwords, storage) if stopwords is None else stopwords
        self.stopwords = frozenset(w.lower() for w in words)
        # Multi-character CJK stopwords are removed by substring; longest first.
        self._cjk_stop = sorted((w for w in self.stopwords if _has_cjk(w)), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        if self.nfkc:
            text = unicodedata.normalize("NFKC", text)
        if not text.isprintable():
            text = "".join(_clean_char(c) for c in text)
        if self.lowercase:
            text = text.lower()
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


def _has_cjk(s: str) -> bool:
    return any("\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" for c in s)


def load_stopwords(spec: str | None, storage: StorageConfig | None = None) -> tuple[str, ...]:
    """``data.text.stopwords`` -> sorted words: built-in ``en``/``zh``/``en+zh`` or a one-per-line file.

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
    """
    if not spec:
        return ()
    names = spec.split("+")
    if all(n in _STOPWORDS for n in names):
        return tuple(sorted({w for n in names for w in _STOPWORDS[n]}))
    from mmray.data import storage as st

    try:
        text = st.read_text(spec, storage)
    except FileNotFoundError:
        raise FileNotFoundError(f"data.text.stopwords: no stopword file at {st.redact(spec)} "
                                f"(built-in lists: {' | '.join(sorted(_STOPWORDS))})") from None  # fmt: skip
    words = {line.strip().lstrip("\ufeff") for line in text.splitlines()}
    return tuple(sorted(w for w in words if w and not w.startswith("#")))


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
        self.backend.enable_padding(direction=config.get("padding_side", "right"), pad_id=pad_id, pad_token=pad,
                                    length=max_length)  # fmt: skip

    @property
    def vocab_size(self) -> int:
        """Ids the model's embedding must hold: the vocabulary plus added (special) tokens."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """int64 ``[N, max_length]`` token ids and attention mask."""
        encodings = self.backend.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), self.max_length)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(len(texts), self.max_length)
        return ids, mask


def train_wordpiece(texts: Iterable[str], vocab_size: int, out_dir: str | Path):
    """Builds a WordPiece tokenizer (BERT pre-tokenizer, CJK-aware) from ``texts``; saves it to ``out_dir``.

    The vocabulary is a pure function of the corpus (``wordpiece_vocab``), so two runs on the same data
    get the same ids and a fixed seed gives the same model. (The ``tokenizers`` WordPiece trainer does
    not: it breaks frequency ties in hash-map order, and its vocabulary changes from run to run.)

    Returns:
        The tokenizer as a ``PreTrainedTokenizerFast``, reloadable with ``load_tokenizer(out_dir)``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # NFKC is applied by TextNormalizer before; here only BERT's CJK-splitting pre-tokenizer.
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=False)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = wordpiece_vocab(words, vocab_size)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]",
                                     max_input_chars_per_word=MAX_WORD_CHARS))  # fmt: skip
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )  # fmt: skip
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def wordpiece_vocab(words: Counter[str], vocab_size: int) -> list[str]:
    """At most ``vocab_size`` tokens: the special tokens, every character seen (word-initial, and as a
    ``##`` continuation where it was seen inside a word), then the most frequent whole words; ranked
    by frequency, ties alphabetically.

    WordPiece splits a word greedily into the longest known prefix and ``##`` pieces, so a word outside
    the vocabulary becomes a known word prefix plus characters, and only unseen characters become
    ``[UNK]``. CJK text is pre-tokenized into single characters, so Chinese is covered character by
    character (as in BERT's Chinese models). Subword-rich languages do better with a pretrained
    tokenizer (``model.text_encoder.tokenizer``).
    """
    chars: Counter[str] = Counter()
    inner: set[str] = set()  # seen after a word's first character (never CJK: each is a word of its own)
    kept = {w: n for w, n in words.items() if len(w) <= MAX_WORD_CHARS}  # longer words are [UNK] whole
    for word, n in kept.items():
        for c in word:
            chars[c] += n
        inner.update(word[1:])
    forms = [*chars.items(), *(("##" + c, n) for c, n in chars.items() if c in inner)]  # any may start a word
    by_frequency = sorted(forms, key=lambda kv: (-kv[1], kv[0]))
    by_frequency += sorted(((w, n) for w, n in kept.items() if len(w) > 1), key=lambda kv: (-kv[1], kv[0]))
    return (SPECIAL_TOKENS + [t for t, _ in by_frequency])[: max(vocab_size, len(SPECIAL_TOKENS))]


def load_tokenizer(name_or_dir: str | Path, storage: StorageConfig | None = None):
    """Loads a tokenizer from an HF hub id (or its local cache), a local directory or an ``s3://`` directory.

    Raises:
        FileNotFoundError: a local or S3 directory that does not exist.
        ValueError: anything else that cannot be loaded, naming the source.
    """
    from mmray.data import storage as st

    name = str(name_or_dir)
    if st.is_s3(name):
        with st.local_dir(name, storage) as local:
            return _from_pretrained(local, shown=name)
    path = os.path.expanduser(name.removeprefix("file://"))
    if name.startswith(("/", "./", "../", "~", "file://")) and not os.path.isdir(path):
        raise FileNotFoundError(f"no tokenizer directory at {name}")
    return _from_pretrained(path, shown=name)


def _from_pretrained(path: str, shown: str):
    from transformers import AutoTokenizer

    from mmray.data import storage as st

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # HF reports a bad id, a missing file or no network as these
        raise ValueError(f"cannot load a tokenizer from {st.redact(shown)}: {st.redact(str(e))[:300]}") from None
