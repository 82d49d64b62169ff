"""The preprocessing actor on one batch, called directly (no Ray needed for the UDF itself)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmray.config import DataConfig, ImageConfig, StorageConfig, TextConfig
from mmray.data import storage
from mmray.data.labels import Task
from mmray.data.pipeline import quarantine_records
from mmray.data.preprocess import Preprocessor, PreprocessSpec, keep_good
from mmray.data.schema import (
    ATTENTION_MASK,
    ERROR,
    ERROR_COLUMN,
    ERROR_STAGE,
    ID,
    IMAGE,
    INPUT_IDS,
    PIXELS,
    POS_IDS,
    TEXT,
    label_key,
    mask_key,
)
from mmray.data.synthetic import make_rows
from mmray.data.text import POS_TAGS, TextNormalizer, TokenEncoder, train_wordpiece
from tests.data.corpus import encoded

TASK = Task("label", "multiclass", ("cat_blue", "cat_red", "dog_blue", "dog_red"))


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("tok")
    train_wordpiece(make_rows(50, seed=1)["text"], vocab_size=200, out_dir=out)
    return {p.name: p.read_bytes() for p in Path(out).iterdir()}


def spec(
    store: StorageConfig | None = None, tasks=(TASK,), text: TextConfig | None = None, **data_kw
) -> PreprocessSpec:
    data = DataConfig(text=text or TextConfig(max_length=16), image=ImageConfig(size=24), **data_kw)
    return PreprocessSpec.from_config(data, store or StorageConfig(), tasks=list(tasks))


def batch_of(rows: dict[str, list]) -> dict[str, np.ndarray]:
    return {k: np.array(v, dtype=object) for k, v in rows.items()}


def test_one_batch_shapes_and_types(tokenizer_files):
    rows = make_rows(6, seed=2)
    out = Preprocessor(spec(), tokenizer_files)(batch_of(rows))
    assert out[INPUT_IDS].shape == (6, 16) and out[INPUT_IDS].dtype == np.int64
    assert out[ATTENTION_MASK].shape == (6, 16)
    assert out[PIXELS].shape == (6, 3, 24, 24) and out[PIXELS].dtype == np.uint8
    assert list(out[ERROR]) == [""] * 6
    assert out[mask_key(TEXT)].tolist() == [1.0] * 6 and out[mask_key(IMAGE)].tolist() == [1.0] * 6
    assert [TASK.classes[i] for i in out[label_key("label")]] == rows["label"]
    assert list(out[ID]) == rows["id"]
    assert out[PIXELS].max() > 0


def test_the_actor_never_imports_torch_or_transformers(tokenizer_files, tmp_path):
    """Each actor that imported them would pay ~7 CPU-s and ~0.7 GB before its first row."""
    import pickle
    import subprocess
    import sys

    (tmp_path / "args.pkl").write_bytes(pickle.dumps((spec(), tokenizer_files, batch_of(make_rows(3, seed=2)))))
    code = (
        "import pickle, sys; from mmray.data.preprocess import Preprocessor; "
        "spec, files, batch = pickle.loads(open(sys.argv[1], 'rb').read()); "
        "assert list(Preprocessor(spec, files)(batch)['_error']) == [''] * 3; "
        "assert not {'torch', 'transformers'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "args.pkl")], check=True, timeout=120)


def test_bad_rows_are_flagged_not_dropped(tokenizer_files):
    rows = make_rows(4, seed=3)
    rows["image"][0] = b"not an image"
    rows["id"][1] = None
    rows["label"][2] = "unicorn"
    rows["text"][3], rows["image"][3] = None, None
    out = Preprocessor(spec(), tokenizer_files)(batch_of(rows))
    assert len(out[ID]) == 4
    assert out[ERROR][0].startswith("unknown or unsupported image format") and out[ERROR_COLUMN][0] == "image"
    assert out[ERROR][1] == "null id" and out[ERROR_COLUMN][1] == "id"
    assert "not in the label map" in out[ERROR][2] and out[ERROR_STAGE][2] == "label"
    assert out[ERROR][3] == "both modalities missing"
    good, bad = keep_good(out), quarantine_records(out)
    assert len(good[ID]) == 0 and bad.num_rows == 4
    assert bad.column("column").to_pylist() == ["image", "id", "label", "text,image"]
    assert ERROR not in good


def test_missing_single_modality_is_kept_with_a_mask(tokenizer_files):
    rows = make_rows(2, seed=4)
    rows["text"][0] = ""
    rows["image"][1] = None
    out = Preprocessor(spec(), tokenizer_files)(batch_of(rows))
    assert list(out[ERROR]) == ["", ""]
    assert out[mask_key(TEXT)].tolist() == [0.0, 1.0]
    assert out[mask_key(IMAGE)].tolist() == [1.0, 0.0]
    assert out[PIXELS][1].max() == 0


def test_missing_modality_quarantine_policy(tokenizer_files):
    rows = make_rows(2, seed=5)
    rows["text"][0] = None
    out = Preprocessor(spec(missing_modality="quarantine"), tokenizer_files)(batch_of(rows))
    assert out[ERROR][0] == "missing text" and out[ERROR][1] == ""


def uri_rows(uris: list[str | None], images: list[bytes | None] | None = None) -> dict[str, list]:
    n = len(uris)
    return {
        "id": [f"u{i}" for i in range(n)],
        "text": ["a photo of my cat"] * n,
        "image": images or [None] * n,
        "image_uri": uris,
        "label": ["cat_red"] * n,
    }


NOT_ALLOWED = "image URI not allowed (local paths must be regular files under data.image_uri_roots): "


def test_images_by_local_uri_bytes_win_and_bad_uris_are_flagged(tokenizer_files, tmp_path):
    (tmp_path / "red.png").write_bytes(encoded((200, 30, 30)))
    blue = encoded((30, 60, 200))
    uris = [
        str(tmp_path / "red.png"),
        f"file://{tmp_path}/red.png",
        str(tmp_path / "red.png"),
        str(tmp_path / "missing.png"),
        "red.png",
        "http://example.com/x.png",
        str(tmp_path),
    ]
    rows = uri_rows(uris, images=[None, None, blue, None, None, None, None])
    out = Preprocessor(spec(image_uri_column="image_uri", image_uri_roots=[str(tmp_path)]), tokenizer_files)(
        batch_of(rows)
    )
    assert list(out[ERROR][:3]) == ["", "", ""]
    assert out[PIXELS][0, 0].mean() > 150 and out[PIXELS][2, 2].mean() > 150  # red by URI, blue by bytes
    assert out[mask_key(IMAGE)][:3].tolist() == [1.0, 1.0, 1.0]
    assert out[ERROR][3] == f"image not found: {tmp_path}/missing.png"
    assert out[ERROR][4].startswith("relative image path 'red.png'")
    assert out[ERROR][5].startswith("invalid image URI: unsupported URI scheme")  # permanent: never retried
    assert out[ERROR][6] == f"{NOT_ALLOWED}{tmp_path}"  # a directory
    assert set(out[ERROR_COLUMN][3:]) == {"image_uri"} and set(out[ERROR_STAGE][3:]) == {"preprocess"}


def test_uris_no_attempt_can_read_get_a_permanent_reason(tokenizer_files, tmp_path):
    """``image fetch failed`` is what --retry-quarantined retries; these never succeed, so they differ."""
    uris = ["http://example.com/x.png", "FILE:///etc/passwd", f"{tmp_path}/a\x00.png", "s3://bucket/a\x00.png"]
    out = Preprocessor(spec(image_uri_column="image_uri", image_uri_roots=[str(tmp_path)]), tokenizer_files)(
        batch_of(uri_rows(uris))
    )
    assert [e.split(": ")[0] for e in out[ERROR]] == ["invalid image URI"] * 4
    assert "unsupported URI scheme in 'FILE:///etc/passwd'" in out[ERROR][1] and "NUL byte" in out[ERROR][2]
    assert not any(e.startswith("image fetch failed") for e in out[ERROR])


def test_local_image_uris_outside_the_roots_are_refused_alike(tokenizer_files, tmp_path):
    """Without data.image_uri_roots no local path is read; with them, only regular files under them, and
    every refusal reads the same, so the quarantine never tells what exists on the node."""
    images, private = tmp_path / "images", tmp_path / "private"
    images.mkdir(), private.mkdir()
    (images / "red.png").write_bytes(encoded((200, 30, 30)))
    (private / "key.png").write_bytes(encoded((0, 0, 0)))
    (images / "link.png").symlink_to(private / "key.png")
    os.mkfifo(images / "fifo.png")
    uris = [
        str(images / "red.png"),
        "/etc/passwd",
        "/etc/no-such-file",
        "file:///etc/passwd",
        "/dev/zero",
        str(images / "link.png"),
        str(images / "fifo.png"),
        f"{images}/../private/key.png",
    ]
    out = Preprocessor(spec(image_uri_column="image_uri", image_uri_roots=[str(images)]), tokenizer_files)(
        batch_of(uri_rows(uris))
    )
    assert out[ERROR][0] == ""
    assert list(out[ERROR][1:]) == [f"{NOT_ALLOWED}{u}" for u in uris[1:]]
    closed = Preprocessor(spec(image_uri_column="image_uri"), tokenizer_files)(batch_of(uri_rows(uris[:1])))
    assert list(closed[ERROR]) == [f"{NOT_ALLOWED}{uris[0]}"]  # default: no local roots at all


def test_oversized_images_are_refused_before_decoding(tokenizer_files, tmp_path):
    big = encoded((200, 30, 30), size=(400, 300))
    (tmp_path / "big.png").write_bytes(big)
    image = ImageConfig(size=24, max_bytes=len(big) - 1)
    s = PreprocessSpec.from_config(
        DataConfig(image=image, image_uri_column="image_uri", image_uri_roots=[str(tmp_path)]),
        StorageConfig(),
        tasks=[TASK],
    )
    rows = uri_rows([None, str(tmp_path / "big.png")], images=[big, None])
    rows["image"][1] = None
    out = Preprocessor(s, tokenizer_files)(batch_of(rows))
    assert out[ERROR][0] == f"image is {len(big)} bytes, above data.image.max_bytes={len(big) - 1}"
    assert out[ERROR_COLUMN][0] == "image"
    assert out[ERROR][1].startswith(f"image above data.image.max_bytes={len(big) - 1} ({len(big)} bytes")
    assert out[ERROR_COLUMN][1] == "image_uri"


def test_a_fetch_that_hangs_is_quarantined_after_the_timeout(tokenizer_files, tmp_path, monkeypatch):
    (tmp_path / "red.png").write_bytes(encoded((200, 30, 30)))
    release = threading.Event()
    real = storage.fetch_bytes

    def fetch(uri, *args, **kwargs):
        if "stalled-" in uri:
            release.wait(60)  # a stalled NFS mount or S3 connection
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(storage, "fetch_bytes", fetch)
    s = spec(image_uri_column="image_uri", image_uri_roots=[str(tmp_path)])
    pre = Preprocessor(s, tokenizer_files, fetch_threads=1, fetch_timeout_s=0.5)
    uris = [
        f"{tmp_path}/stalled-1.png",
        str(tmp_path / "red.png"),
        f"{tmp_path}/stalled-2.png",
        str(tmp_path / "red.png"),
    ]
    try:
        out = pre(batch_of(uri_rows(uris)))
    finally:
        release.set()
    assert list(out[ERROR]) == [
        f"image fetch timed out after 0.5s: {uris[0]}",
        "",
        f"image fetch timed out after 0.5s: {uris[2]}",
        "",
    ]
    assert out[PIXELS][1, 0].mean() > 150 and out[PIXELS][3, 0].mean() > 150


def test_huge_text_is_cut_before_normalising_and_refused_above_the_byte_limit(tokenizer_files):
    text = TextConfig(max_length=16, max_chars=30, max_bytes=1000)
    rows = make_rows(4, seed=8)
    rows["text"][0] = "a photo of my cat " * 50  # 900 bytes: kept, cut to 30 characters
    rows["text"][1] = "猫" * 334  # 1002 bytes in UTF-8, 334 characters: refused
    rows["text"][2] = "x" * 1001
    rows["text"][3] = "a photo of my cat"
    pre = Preprocessor(spec(text=text), tokenizer_files)
    seen = []
    normalize = pre.normalize_text
    pre.normalize_text = lambda t: seen.append(len(t)) or normalize(t)
    out = pre(batch_of(rows))
    assert out[ERROR][0] == "" and seen[0] == 30
    cut = pre(batch_of({**make_rows(1, seed=8), "text": ["a photo of my cat a photo of m"]}))  # 30 characters
    assert out[INPUT_IDS][0].tolist() == cut[INPUT_IDS][0].tolist()
    assert out[ERROR][1] == "text is 1002 bytes, above data.text.max_bytes=1000"
    assert out[ERROR][2] == "text is 1001 bytes, above data.text.max_bytes=1000"
    assert (out[ERROR_COLUMN][1], out[ERROR_STAGE][1]) == ("text", "preprocess")
    assert out[ERROR][3] == ""


def test_quarantine_reasons_never_carry_a_secret(tokenizer_files, s3_server):
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    rows = uri_rows([f"s3://AKIAIOSFODNN7EXAMPLE:{secret}@bucket/x.png", None])
    rows["label"][1] = f"https://admin:{secret}@labels.internal/x"
    rows["image"] = [None, encoded((1, 2, 3))]
    out = Preprocessor(spec(StorageConfig(s3_endpoint_url=s3_server), image_uri_column="image_uri"), tokenizer_files)(
        batch_of(rows)
    )
    assert out[ERROR][0].startswith("invalid image URI: s3:// URIs must not embed credentials")
    assert "s3://***@bucket/x.png" in out[ERROR][0]
    assert "https://***@labels.internal/x" in out[ERROR][1]
    assert not any("K7MDENG" in e or "AKIAIOSFODNN7EXAMPLE" in e for e in out[ERROR])


def test_images_by_s3_uri(tokenizer_files, s3_server, s3_bucket):
    store = StorageConfig(s3_endpoint_url=s3_server)
    storage.write_bytes(f"s3://{s3_bucket}/img/red.png", encoded((200, 30, 30)), store)
    rows = uri_rows([f"s3://{s3_bucket}/img/red.png", f"s3://{s3_bucket}/img/nope.png", f"s3://{s3_bucket}-x/a.png"])
    pre = Preprocessor(spec(store, image_column=None, image_uri_column="image_uri"), tokenizer_files, fetch_threads=2)
    out = pre(batch_of({k: v for k, v in rows.items() if k != "image"}))
    assert out[ERROR][0] == "" and out[PIXELS][0, 0].mean() > 150
    assert out[ERROR][1] == f"image not found: s3://{s3_bucket}/img/nope.png"
    assert out[ERROR][2].startswith("image not found")  # no such bucket


def test_label_kinds_and_bad_labels_are_flagged(tokenizer_files):
    tasks = [Task("tags", "multilabel", ("a", "b", "c")), Task("score", "regression")]
    rows = make_rows(4, seed=6)
    rows.pop("label")
    rows["tags"] = [["a", "c"], "a", ["a", "zzz"], []]
    rows["score"] = [0.5, 1.0, 2.0, "high"]
    batch = batch_of(rows)
    batch["tags"] = np.empty(4, dtype=object)  # Ray hands list cells over as arrays
    for i, v in enumerate(rows["tags"]):
        batch["tags"][i] = np.array(v, dtype=object) if isinstance(v, list) else v
    out = Preprocessor(spec(tasks=tasks), tokenizer_files)(batch)
    assert out[ERROR][0] == "" and out[label_key("tags")][0].tolist() == [1.0, 0.0, 1.0]
    assert out[label_key("score")][0] == pytest.approx(0.5)
    assert "is not a list of labels" in out[ERROR][1]
    assert "'zzz' in column 'tags' is not in the label map" in out[ERROR][2]
    assert "'high' in column 'score' is not a number" in out[ERROR][3] and out[ERROR_STAGE][3] == "label"


class _PickyTokenizer:
    """Wraps a tokenizer and rejects any batch containing "BOOM", as a broken tokenizer might."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, texts):
        if any("BOOM" in t for t in texts):
            raise ValueError("cannot tokenize BOOM")
        return self.inner(texts)


def test_a_row_the_tokenizer_rejects_is_quarantined_alone(tokenizer_files):
    rows = make_rows(3, seed=7)
    rows["text"][1] = "BOOM goes the cat"
    pre = Preprocessor(spec(), tokenizer_files)
    expected = pre(batch_of(make_rows(3, seed=7)))
    pre.tokenize = _PickyTokenizer(pre.tokenize)
    out = pre(batch_of(rows))
    assert list(out[ERROR]) == ["", "tokenizer failed: ValueError: cannot tokenize BOOM", ""]
    assert out[ERROR_STAGE][1] == "tokenize" and out[mask_key(TEXT)][1] == 0.0
    for i in (0, 2):
        assert out[INPUT_IDS][i].tolist() == expected[INPUT_IDS][i].tolist()


def test_stopwords_are_resolved_into_the_spec_and_survive_a_round_trip(tmp_path, tokenizer_files):
    words = tmp_path / "stop.txt"
    words.write_text("\ufeffphoto\n# a comment\nmy\n\n")
    s = spec(text=TextConfig(max_length=16, stopwords=str(words)))
    assert s.stopword_list == ("my", "photo")
    words.unlink()  # scoring must not need the file any more
    restored = PreprocessSpec.from_dict(s.to_dict(), tasks=s.tasks, storage=StorageConfig())
    assert restored == s and not {"storage", "tasks", "with_labels"} & set(s.to_dict())
    pre = Preprocessor(restored, tokenizer_files)
    assert pre.normalize_text("A photo of my cat") == "A of cat"


ids = st.one_of(st.none(), st.text(max_size=8), st.integers())
texts = st.one_of(st.none(), st.text(max_size=60))
images = st.one_of(
    st.none(), st.binary(max_size=64), st.sampled_from([encoded((200, 30, 30)), encoded((0, 0, 0), "JPEG")])
)
labels = st.one_of(st.none(), st.sampled_from(list(TASK.classes) + ["unicorn", ""]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(ids, texts, images, labels), min_size=1, max_size=12))
def test_random_rows_never_crash_and_every_row_is_accounted_for(tokenizer_files, rows):
    batch = {}
    for key, values in zip(("id", "text", "image", "label"), zip(*rows)):
        batch[key] = np.empty(len(values), dtype=object)
        batch[key][:] = values
    out = Preprocessor(spec(), tokenizer_files)(batch)
    n = len(rows)
    assert all(len(v) == n for v in out.values())
    good, bad = keep_good(out), quarantine_records(out)
    assert len(good[ID]) + bad.num_rows == n
    for i, (raw_id, _text, _image, label) in enumerate(rows):
        if out[ERROR][i] == "":
            assert out[ID][i] == str(raw_id) and label in TASK.classes
            assert out[mask_key(TEXT)][i] + out[mask_key(IMAGE)][i] >= 1.0
            assert (out[ATTENTION_MASK][i].sum() > 2) == (out[mask_key(TEXT)][i] == 1.0)
        else:
            assert out[ERROR_STAGE][i] in ("preprocess", "label", "tokenize") and len(out[ERROR][i]) <= 240


def test_segmenter_and_pos_tags_come_out_aligned_and_identical_from_the_stored_spec_alone(tmp_path):
    import json

    (tmp_path / "dict.txt").write_text("红圆圈 5 nz\n", encoding="utf-8")
    text = TextConfig(
        max_length=12, segmenter="jieba", stopwords="zh", pos_tags=True, user_dict=str(tmp_path / "dict.txt")
    )
    rows = make_rows(4, seed=3)
    rows["text"] = ["我们的红圆圈在这里", "一个红色的三角形", "my cat 和 小狗", "没有"]  # the last: all stopwords
    at_training = spec(text=text)
    normalize = TextNormalizer(text)
    train_wordpiece([normalize(t) for t in rows["text"]], vocab_size=100, out_dir=tmp_path / "tok", split_cjk=False)
    files = {p.name: p.read_bytes() for p in (tmp_path / "tok").iterdir()}
    trained = Preprocessor(at_training, files)(batch_of(rows))
    assert trained[POS_IDS].shape == trained[INPUT_IDS].shape == (4, 12)
    enc = TokenEncoder(files, 12)
    tokens = enc.backend.encode(normalize(rows["text"][0])).tokens[:5]
    assert tokens == ["[CLS]", "红圆圈", "这里", "[SEP]", "[PAD]"]  # 我们, 的, 在 gone; the user's word whole
    propn = POS_TAGS.index("PROPN")  # nz, the tag the user dictionary gives
    assert trained[POS_IDS][0, :5].tolist() == [0, propn, POS_TAGS.index("PRON"), 0, 0]
    assert trained[mask_key(TEXT)].tolist() == [1.0, 1.0, 1.0, 0.0]  # nothing left of row 3's text

    # Scoring's spec comes from the checkpoint's JSON alone: the user dictionary's file is gone.
    (tmp_path / "dict.txt").unlink()
    stored = json.loads(json.dumps(at_training.to_dict(), ensure_ascii=False))
    assert stored["user_dict_lines"] == ["红圆圈 5 nz"] and stored["text"]["segmenter"] == "jieba"
    scored = Preprocessor(PreprocessSpec.from_dict(stored, tasks=(TASK,), with_labels=False), files)(batch_of(rows))
    for key in (INPUT_IDS, ATTENTION_MASK, POS_IDS):
        assert np.array_equal(scored[key], trained[key]), key


def test_without_pos_tags_there_is_no_pos_column(tokenizer_files):
    assert POS_IDS not in Preprocessor(spec(), tokenizer_files)(batch_of(make_rows(2, seed=4)))
