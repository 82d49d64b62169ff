"""Word lists the text normaliser reads: stopwords (``data.text.stopwords``) and a jieba user
dictionary (``data.text.user_dict``), built-in or from a file at any URI ``storage`` reads.

Both are resolved once, on the driver, into plain tuples that travel with the preprocessing spec and
the checkpoint, so no actor and no scoring run depends on the training machine's files.
"""

from __future__ import annotations

from mmray.config import StorageConfig

__all__ = ["load_stopwords", "load_user_dict"]

# Short built-in lists; a user file (one word per line) replaces them via data.text.stopwords.
_STOPWORDS = {
    "en": """a an and are as at be but by for from has have he her his i in is it its of on or our she
        that the their them they this to was we were what which who will with you your""".split(),
    "zh": "的 了 和 是 在 也 就 都 而 及 与 着 或 一个 没有 我们 你们 他们 这 那 之 吗 呢 吧 啊".split(),
}


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
