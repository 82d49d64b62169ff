"""Universal POS tags per word (``data.text.pos_tags``): jieba's tags mapped to UPOS for rows with
Chinese, a spaCy pipeline (``data.text.pos_model``) for the rest when one is named.

``TokenEncoder.encode`` aligns the character spans given here to (sub-)tokens.
"""

from __future__ import annotations

import unicodedata

from mmray.data.schema import POS_TAGS
from mmray.data.text.normalize import has_cjk
from mmray.data.text.segment import Segmenter

__all__ = ["PosTagger", "check_pos_model"]

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
        if self.nlp is not None and not has_cjk(text):
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
