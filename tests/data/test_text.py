"""Tokenizers and text normalisation: Chinese must tokenize into real ids, not [UNK] or one blob."""

from __future__ import annotations

import pytest

from mmray.config import TextConfig
from mmray.data.text import TextNormalizer, load_tokenizer, train_wordpiece

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
