"""Text normalisation, word segmentation, part-of-speech tags and tokenizers (pretrained via
``AutoTokenizer`` or a CJK-aware WordPiece).

Whitespace tokenizers fail on Chinese, which has no spaces. The WordPiece built here isolates every CJK
character by default, so Chinese, mixed-script and emoji text get real ids. With ``data.text.segmenter:
jieba`` Chinese is first cut into words (``Segmenter``), joined by spaces: stopwords then match whole
words, and a WordPiece trained with ``split_cjk=False`` learns whole words. ``PosTagger`` gives each word
a Universal POS tag; ``TokenEncoder.encode`` aligns those tags to (sub-)tokens by character offsets.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import re
import unicodedata
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mmray.config import StorageConfig, TextConfig
from mmray.data.schema import POS_TAGS

__all__ = [
    "POS_TAGS",
    "PosTagger",
    "Segmenter",
    "TextNormalizer",
    "TokenEncoder",
    "TextTooLarge",
    "bounded_text",
    "check_pos_model",
    "load_stopwords",
    "load_tokenizer",
    "load_user_dict",
    "read_tokenizer_dir",
    "shared_segmenter",
    "train_wordpiece",
    "wordpiece_vocab",
]

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

_POS_ID = {t: i for i, t in enumerate(POS_TAGS)}
# jieba's (ICTCLAS) tags -> Universal POS, looked up by the tag, then its first two letters, then its
# first letter (nrt, nrfg -> nr; uj, ul -> u; vg -> v). Classifiers (q) are NOUN, as in UD Chinese.
_JIEBA_UPOS = {
    "a": "ADJ",
    "ad": "ADV",
    "an": "NOUN",
    "b": "ADJ",
    "c": "CCONJ",
    "d": "ADV",
    "e": "INTJ",
    "eng": "X",
    "f": "ADP",
    "g": "X",
    "h": "X",
    "i": "X",
    "j": "NOUN",
    "k": "PART",
    "l": "X",
    "m": "NUM",
    "n": "NOUN",
    "nr": "PROPN",
    "ns": "PROPN",
    "nt": "PROPN",
    "nz": "PROPN",
    "o": "X",
    "p": "ADP",
    "q": "NOUN",
    "r": "PRON",
    "s": "NOUN",
    "t": "NOUN",
    "u": "PART",
    "v": "VERB",
    "vd": "ADV",
    "vn": "NOUN",
    "w": "PUNCT",
    "y": "PART",
    "z": "ADJ",
}


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
        self._cjk_stop = sorted((w for w in self.stopwords if _has_cjk(w)), key=len, reverse=True)
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


def _has_cjk(s: str) -> bool:
    return any("\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" for c in s)


class Segmenter:
    """jieba word segmentation and POS tags over its own dictionary: the bundled one plus user words.

    A private ``jieba.Tokenizer`` per instance, never jieba's global one, so two configurations in one
    process (tests, a driver building a tokenizer) cannot leak user words into each other. Building it
    loads the dictionary (~0.5 s from jieba's cache in the temp directory, ~60 MB): ``shared_segmenter``.

    Args:
        user_dict: lines of a jieba user dictionary (``word [freq] [tag]``), as ``load_user_dict`` reads.
    """

    def __init__(self, user_dict: Iterable[str] = ()):
        import jieba

        jieba.setLogLevel(logging.WARNING)  # its "Building prefix dict ..." would go to every actor's log
        self._jieba = jieba.Tokenizer()
        lines = "\n".join(user_dict)
        if lines:
            self._jieba.load_userdict(io.BytesIO(lines.encode("utf-8")))
        else:
            self._jieba.initialize()
        self._posseg = None  # jieba.posseg over this dictionary: load_tags

    def words(self, text: str) -> list[str]:
        """The words of ``text`` in order; whitespace dropped (jieba returns it as words of its own)."""
        return [w for w in self._jieba.cut(text) if not w.isspace()]

    def tagged(self, text: str) -> list[tuple[str, str]]:
        """(word, jieba tag) pairs covering ``text``; a known word is looked up, the rest is cut by posseg."""
        posseg = self.load_tags()
        known = posseg.word_tag_tab.get(text)
        if known is not None:
            return [(text, known)]
        return [(p.word, p.flag) for p in posseg.cut(text)]

    def load_tags(self):
        """jieba's POS tagger over this dictionary, built once (a second or so): ``PosTagger`` builds it
        when an actor starts rather than in its first batch."""
        if self._posseg is None:
            from jieba import posseg

            # POSTokenizer(self._jieba) would parse the dictionary file for its tags once more (~1.5 s),
            # after importing posseg already did for jieba's global tagger: copy that table instead.
            self._posseg = posseg.POSTokenizer.__new__(posseg.POSTokenizer)
            self._posseg.tokenizer, self._posseg.word_tag_tab = self._jieba, dict(posseg.dt.word_tag_tab)
            self._posseg.makesure_userdict_loaded()  # user words' tags (load_userdict) into word_tag_tab
        return self._posseg


@functools.lru_cache(maxsize=4)
def shared_segmenter(user_dict: tuple[str, ...] = ()) -> Segmenter:
    """One ``Segmenter`` per user dictionary per process: building one loads jieba's dictionary (~1 s,
    ~60 MB) and its tags another ~1.5 s; it is read-only once built, so actors and callers share it."""
    return Segmenter(user_dict)


class PosTagger:
    """Universal POS tags of a normalised text, as ``(start, end, tag id)`` character spans.

    Rows with a CJK character are tagged by jieba (``Segmenter.tagged``, per space-separated chunk: a
    segmented text's words are looked up directly); other rows by the spaCy pipeline ``pos_model`` when
    one is named, else by jieba too (which tags Latin words ``X`` and numbers ``NUM``).

    Raises:
        ValueError: ``pos_model`` is named but spaCy or that pipeline is not installed (``check_pos_model``).
    """

    def __init__(self, segmenter: Segmenter, pos_model: str | None = None):
        self.segmenter = segmenter
        segmenter.load_tags()
        self.nlp = _load_spacy(pos_model) if pos_model else None

    def __call__(self, text: str) -> list[tuple[int, int, int]]:
        if self.nlp is not None and not _has_cjk(text):
            return [
                (t.idx, t.idx + len(t.text), _POS_ID.get(t.pos_, _POS_ID["X"]))
                for t in self.nlp(text)
                if not t.is_space
            ]
        spans, at = [], 0
        for chunk in text.split(" "):
            for word, flag in self.segmenter.tagged(chunk) if chunk else ():
                start = text.find(word, at)
                if start < 0:  # never seen (posseg returns pieces of its input); skip, do not misalign
                    continue
                at = start + len(word)
                if not word.isspace():
                    spans.append((start, at, _POS_ID[_jieba_upos(flag, word)]))
        return spans


def _jieba_upos(flag: str, word: str) -> str:
    if flag == "x":  # jieba's "not a word": punctuation, symbols, stray characters, lone digits
        if word.replace(".", "", 1).isdigit():
            return "NUM"
        cats = {unicodedata.category(c)[0] for c in word}
        return "PUNCT" if cats == {"P"} else "SYM" if cats <= {"P", "S"} else "X"
    return _JIEBA_UPOS.get(flag) or _JIEBA_UPOS.get(flag[:2]) or _JIEBA_UPOS.get(flag[:1], "X")


def _load_spacy(name: str):
    try:
        import spacy
    except ImportError:
        raise ValueError(
            f"data.text.pos_model: {name!r} is a spaCy pipeline, but spaCy is not installed "
            f"(pip install spacy && python -m spacy download {name}); or set data.text.pos_model=null "
            "to tag every row with jieba"
        ) from None
    try:
        return spacy.load(name, exclude=["parser", "ner", "lemmatizer", "textcat"])  # only what tags
    except OSError as e:
        raise ValueError(
            f"data.text.pos_model: spaCy pipeline {name!r} is not installed "
            f"(python -m spacy download {name}): {str(e)[:200]}"
        ) from None


def check_pos_model(name: str | None) -> None:
    """Fails fast, on the driver, when ``data.text.pos_model`` cannot be loaded (see ``PosTagger``)."""
    if name:
        _load_spacy(name)


def load_user_dict(spec: str | None, storage: StorageConfig | None = None) -> tuple[str, ...]:
    """``data.text.user_dict`` -> its non-empty, non-comment lines (``word [freq] [tag]``), in file order.

    Raises:
        FileNotFoundError: the file does not exist (the message names it).
    """
    if not spec:
        return ()
    from mmray.data.storage import read_text, redact

    try:
        text = read_text(spec, storage)
    except FileNotFoundError:
        raise FileNotFoundError(f"data.text.user_dict: no user dictionary at {redact(spec)}") from None
    lines = (line.strip().lstrip("\ufeff") for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


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
    from mmray.data.storage import read_text, redact

    try:
        text = read_text(spec, storage)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"data.text.stopwords: no stopword file at {redact(spec)} "
            f"(built-in lists: {' | '.join(sorted(_STOPWORDS))})"
        ) from None
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


def train_wordpiece(texts: Iterable[str], vocab_size: int, out_dir: str | Path, split_cjk: bool = True):
    """Builds a WordPiece tokenizer (BERT pre-tokenizer, CJK-aware) from ``texts``; saves it to ``out_dir``.

    The vocabulary is a pure function of the corpus (``wordpiece_vocab``), so two runs on the same data
    get the same ids and a fixed seed gives the same model. (The ``tokenizers`` WordPiece trainer does
    not: it breaks frequency ties in hash-map order, and its vocabulary changes from run to run.)

    Args:
        split_cjk: every CJK character is a word of its own (BERT's Chinese handling). False for text
            already segmented into words separated by spaces (``data.text.segmenter: jieba``): Chinese
            words are then kept whole where frequent, split into known characters otherwise.

    Returns:
        The tokenizer as a ``PreTrainedTokenizerFast``, reloadable with ``load_tokenizer(out_dir)``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # NFKC is applied by TextNormalizer before; here only BERT's CJK-splitting pre-tokenizer.
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=split_cjk, lowercase=False)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = wordpiece_vocab(words, vocab_size)
    tok = Tokenizer(
        models.WordPiece(
            {t: i for i, t in enumerate(vocab)}, unk_token="[UNK]", max_input_chars_per_word=MAX_WORD_CHARS
        )
    )
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
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
    character (as in BERT's Chinese models), unless it was segmented into words (``split_cjk=False``). Subword-rich languages do better with a pretrained
    tokenizer (``model.text_encoder.tokenizer``).
    """
    chars: Counter[str] = Counter()
    inner: set[str] = set()  # seen after a word's first character (CJK only when segmented into words)
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
