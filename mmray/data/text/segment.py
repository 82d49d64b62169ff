"""Chinese word segmentation (``data.text.segmenter: jieba``) and jieba's word tags, over a private
dictionary per user word list.

Whitespace tokenizers fail on Chinese, which has no spaces: cut into words first, stopwords match
whole words and a WordPiece trained with ``split_cjk=False`` learns whole words.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Iterable

__all__ = ["Segmenter", "shared_segmenter"]


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
