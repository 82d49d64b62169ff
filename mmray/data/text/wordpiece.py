"""A WordPiece tokenizer trained on the training texts when no pretrained one is named: CJK-aware,
and a pure function of the corpus, so a fixed seed gives the same ids and the same model.

The BERT pre-tokenizer here isolates every CJK character by default, so Chinese, mixed-script and emoji
text get real ids; text already segmented into words (``data.text.segmenter: jieba``) trains with
``split_cjk=False`` and keeps frequent Chinese words whole.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

__all__ = ["MAX_WORD_CHARS", "SPECIAL_TOKENS", "train_wordpiece", "wordpiece_vocab"]

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MAX_WORD_CHARS = 100  # BERT's limit: a longer "word" is [UNK]


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
