"""Text for the models: normalisation, Chinese word segmentation, part-of-speech tags and tokenizers
(pretrained via ``AutoTokenizer`` or a CJK-aware WordPiece), one job per module:

* ``normalize``: size limits and ``TextNormalizer`` (NFKC, cleanup, lowercase, stopwords, words).
* ``segment``: jieba word segmentation (``Segmenter``, ``shared_segmenter``).
* ``pos``: Universal POS tags per word (``PosTagger``), from jieba or a spaCy pipeline.
* ``dictionaries``: stopword lists and jieba user dictionaries.
* ``encoder``: a saved tokenizer loaded (``load_tokenizer``) and run in actors (``TokenEncoder``).
* ``wordpiece``: the WordPiece trained from the data when no tokenizer is named.

Whitespace tokenizers fail on Chinese, which has no spaces. The WordPiece built here isolates every CJK
character by default, so Chinese, mixed-script and emoji text get real ids. With ``data.text.segmenter:
jieba`` Chinese is first cut into words (``Segmenter``), joined by spaces: stopwords then match whole
words, and a WordPiece trained with ``split_cjk=False`` learns whole words. ``PosTagger`` gives each word
a Universal POS tag; ``TokenEncoder.encode`` aligns those tags to (sub-)tokens by character offsets.
"""

from mmray.data.schema import POS_TAGS
from mmray.data.text.dictionaries import load_stopwords, load_user_dict
from mmray.data.text.encoder import TokenEncoder, load_tokenizer, read_tokenizer_dir
from mmray.data.text.normalize import TextNormalizer, TextTooLarge, bounded_text
from mmray.data.text.pos import PosTagger, check_pos_model
from mmray.data.text.segment import Segmenter, shared_segmenter
from mmray.data.text.wordpiece import SPECIAL_TOKENS, train_wordpiece, wordpiece_vocab

__all__ = [
    "POS_TAGS",
    "SPECIAL_TOKENS",
    "PosTagger",
    "Segmenter",
    "TextNormalizer",
    "TextTooLarge",
    "TokenEncoder",
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
