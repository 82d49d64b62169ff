"""Text normalisation and tokenizers (pretrained via ``AutoTokenizer`` or a CJK-aware WordPiece).

Whitespace tokenizers fail on Chinese, which has no spaces. The WordPiece trained here uses the BERT
pre-tokenizer, which isolates every CJK character, so Chinese, mixed-script and emoji text get real ids.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from mmray.config import StorageConfig, TextConfig

__all__ = ["TextNormalizer", "load_tokenizer", "train_wordpiece"]

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Short built-in lists; a user file (one word per line) replaces them via data.text.stopwords.
_STOPWORDS = {
    "en": """a an and are as at be but by for from has have he her his i in is it its of on or our she
        that the their them they this to was we were what which who will with you your""".split(),
    "zh": "的 了 和 是 在 也 就 都 而 及 与 着 或 一个 没有 我们 你们 他们 这 那 之 吗 呢 吧 啊".split(),
}
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_SPACES = re.compile(r"\s+")


class TextNormalizer:
    """NFKC, whitespace cleanup, optional lowercasing and stopword removal; the same at train and score."""

    def __init__(self, cfg: TextConfig, storage: StorageConfig | None = None):
        self.nfkc = cfg.nfkc
        self.lowercase = cfg.lowercase
        self.stopwords = _load_stopwords(cfg.stopwords, storage)
        # Multi-character CJK stopwords are removed by substring; longest first.
        self._cjk_stop = sorted((w for w in self.stopwords if _has_cjk(w)), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        if self.nfkc:
            text = unicodedata.normalize("NFKC", text)
        text = "".join(c if c.isprintable() or c.isspace() else " " for c in text)
        if self.lowercase:
            text = text.lower()
        if self.stopwords:
            for w in self._cjk_stop:
                text = text.replace(w, " ")
            text = " ".join(t for t in _WORD.findall(text) if t.lower() not in self.stopwords)
        return _SPACES.sub(" ", text).strip()


def _has_cjk(s: str) -> bool:
    return any("\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" for c in s)


def _load_stopwords(spec: str | None, storage: StorageConfig | None) -> frozenset[str]:
    if not spec:
        return frozenset()
    names = spec.split("+")
    if all(n in _STOPWORDS for n in names):
        return frozenset(w for n in names for w in _STOPWORDS[n])
    from mmray.data import storage as st

    text = st.read_text(spec, storage)
    return frozenset(line.strip() for line in text.splitlines() if line.strip())


def train_wordpiece(texts: Iterable[str], vocab_size: int, out_dir: str | Path):
    """Trains a WordPiece tokenizer (BERT pre-tokenizer, CJK-aware) and saves it to ``out_dir``.

    Returns:
        The tokenizer as a ``PreTrainedTokenizerFast``, reloadable with ``load_tokenizer(out_dir)``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    # NFKC is applied by TextNormalizer before; here only BERT's CJK-splitting pre-tokenizer.
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )  # fmt: skip
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(name_or_dir: str, storage: StorageConfig | None = None):
    """Loads a tokenizer from an HF hub id, a local directory or an ``s3://`` directory."""
    from transformers import AutoTokenizer

    from mmray.data import storage as st

    if st.is_s3(name_or_dir):
        name_or_dir = st.copy_dir_from(name_or_dir, storage)
    return AutoTokenizer.from_pretrained(name_or_dir)
