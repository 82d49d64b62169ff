"""The predictor actor on batches, called directly (no Ray): outputs, bad rows, multi-task, model_id."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from mmray.checkpoint import TOKENIZER_DIR, model_id, open_checkpoint
from mmray.config import AlignConfig, StorageConfig
from mmray.data import storage
from mmray.data.labels import Task
from mmray.data.schema import ERROR, ERROR_STAGE, ID, IMAGE, ROW, TEXT, label_key
from mmray.data.synthetic import make_rows
from mmray.score.labeled import LABEL_ERROR, LabeledPreprocessor
from mmray.score.predictor import Predictor, logits_key, model_inputs, output_columns, output_schema, row_output
from tests.score.conftest import CLASSES, TASK, make_checkpoint


def preprocessed(ckpt: Path, rows: dict[str, list], label_tasks=()) -> dict[str, np.ndarray]:
    with open_checkpoint(ckpt) as opened:
        spec, tokenizer = opened.info.preprocess_spec(with_labels=False), opened.tokenizer_files()
    return LabeledPreprocessor(spec, tokenizer, label_tasks)({k: np.array(v, dtype=object) for k, v in rows.items()})


def test_good_rows_get_predictions_and_bad_rows_pass_through_with_their_error(tiny_checkpoint):
    rows = make_rows(6, seed=3)
    rows["image"][1], rows["text"][1] = b"not an image", None
    predict = Predictor(str(tiny_checkpoint), StorageConfig(), model_id(tiny_checkpoint))
    out = predict(preprocessed(tiny_checkpoint, rows))

    assert list(out[ID]) == rows["id"]
    assert out[ERROR][1] != "" and out[ERROR_STAGE][1] == "preprocess"
    assert out["prediction"][1] is None and out["probabilities"][1] is None
    for i in (0, 2, 3, 4, 5):
        probs = np.array(out["probabilities"][i])
        assert out[ERROR][i] == "" and probs.shape == (4,) and probs.sum() == pytest.approx(1.0, abs=1e-6)
        assert out["prediction"][i] == CLASSES[int(probs.argmax())]
        assert out["confidence"][i] == pytest.approx(probs.max())
    table = pa.table({c: pa.array(list(out[c])) for c in output_schema([TASK]).names})
    assert table.cast(output_schema([TASK])).num_rows == 6  # what finalize does with Ray's blocks
    assert ROW not in out  # a batch without input positions gets none
    # The split layout's predicting pool gets the slice readers' positions and must pass them on.
    positioned = {**preprocessed(tiny_checkpoint, rows), ROW: np.arange(10, 16)}
    assert list(predict(positioned)[ROW]) == list(range(10, 16))


def test_a_rows_prediction_does_not_depend_on_its_batch(tiny_checkpoint):
    rows = make_rows(8, seed=4)
    predict = Predictor(str(tiny_checkpoint), StorageConfig())
    together = predict(preprocessed(tiny_checkpoint, rows))
    for i in range(8):
        alone = predict(preprocessed(tiny_checkpoint, {k: v[i : i + 1] for k, v in rows.items()}))
        assert alone["prediction"][0] == together["prediction"][i]
        np.testing.assert_allclose(alone["probabilities"][0], together["probabilities"][i], rtol=0, atol=1e-6)


def test_embeddings_are_the_models_vectors_with_null_for_a_missing_modality(tiny_checkpoint):
    rows = make_rows(5, seed=8)
    rows["image"][1], rows["text"][1] = b"not an image", None  # quarantined: no vector at all
    rows["text"][3] = None  # no text: a text vector would describe padding
    batch = preprocessed(tiny_checkpoint, rows)
    embed = Predictor(str(tiny_checkpoint), StorageConfig(), row_kind="embeddings")
    out = embed(batch)

    good = np.array([0, 2, 3, 4])
    with torch.no_grad():
        want = embed.model(model_inputs(batch, good, torch.device("cpu")))
    assert out[ERROR][1] != "" and out["fused"][1] is None and out[TEXT][1] is None and out[IMAGE][1] is None
    assert out[TEXT][3] is None and len(out[IMAGE][3]) == 16  # make_checkpoint's encoders are 16 wide
    for j, i in enumerate(good):
        np.testing.assert_array_equal(np.float32(out["fused"][i]), want["fused"][j].numpy())
        np.testing.assert_array_equal(np.float32(out[IMAGE][i]), want["pooled"][IMAGE][j].numpy())
    # Against the model's parts, run independently: each encoder alone, then the fusion on their outputs.
    inputs = model_inputs(batch, good, torch.device("cpu"))
    with torch.no_grad():
        features = embed.model.encode(inputs)
        fused = embed.model.fusion(features, embed.model.masks(inputs))
    for j, i in enumerate(good):
        np.testing.assert_allclose(np.float32(out["fused"][i]), fused[j].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.float32(out[IMAGE][i]), features[IMAGE].pooled[j].numpy(), rtol=1e-5, atol=1e-6)
        if i != 3:  # row 3 has no text
            np.testing.assert_allclose(np.float32(out[TEXT][i]), features[TEXT].pooled[j].numpy(), rtol=1e-5, atol=1e-6)
    schema = row_output("embeddings", [TASK]).schema()
    table = pa.table({c: pa.array(list(out[c])) for c in schema.names}).cast(schema)
    assert table.column(TEXT).null_count == 2 and table.column("fused").null_count == 1
    with pytest.raises(ValueError, match="--evaluate needs predictions"):
        row_output("embeddings", [TASK], evaluate=True)


def test_an_aligned_checkpoint_also_embeds_its_joint_space_unit_vectors(tiny_checkpoint, tmp_path):
    assert row_output("embeddings", [TASK]).schema().names == ["id", "fused", IMAGE, TEXT]  # unaligned: unchanged
    ckpt = make_checkpoint(tmp_path, [TASK], align=AlignConfig(weight=1.0, projection_dim=8))
    rows = make_rows(5, seed=9)
    rows["image"][1], rows["text"][1] = b"not an image", None  # quarantined: no vector at all
    rows["text"][3] = None  # no text: no text vector
    batch = preprocessed(ckpt, rows)
    embed = Predictor(str(ckpt), StorageConfig(), row_kind="embeddings")
    out = embed(batch)

    schema = row_output("embeddings", [TASK], aligned=True).schema()
    assert schema.names == ["id", "fused", IMAGE, TEXT, "image_aligned", "text_aligned"]
    assert schema.field("text_aligned").type == pa.list_(pa.float32())
    good = np.array([0, 2, 3, 4])
    with open_checkpoint(ckpt) as opened, torch.no_grad():  # an independent copy of the model
        model = opened.load_model()
        features = model.encode(model_inputs(batch, good, torch.device("cpu")))
        want = model.align({m: features[m].pooled for m in (IMAGE, TEXT)})
    assert out["text_aligned"][1] is None and out["image_aligned"][1] is None and out["text_aligned"][3] is None
    for j, i in enumerate(good):
        np.testing.assert_allclose(np.float32(out["image_aligned"][i]), want[IMAGE][j].numpy(), rtol=0, atol=1e-6)
        assert np.linalg.norm(out["image_aligned"][i]) == pytest.approx(1.0, abs=1e-5)
        if i != 3:
            np.testing.assert_allclose(np.float32(out["text_aligned"][i]), want[TEXT][j].numpy(), rtol=0, atol=1e-6)
    table = pa.table({c: pa.array(list(out[c])) for c in schema.names}).cast(schema)
    assert table.column("text_aligned").null_count == 2 and table.column("image_aligned").null_count == 1


def test_a_checkpoint_that_changed_since_the_driver_hashed_it_is_refused(tiny_checkpoint):
    with pytest.raises(RuntimeError, match="changed during scoring"):
        Predictor(str(tiny_checkpoint), StorageConfig(), expected_model_id="0" * 16)


def test_multi_task_columns_are_suffixed_and_typed(tmp_path):
    tasks = [
        TASK,
        Task("tags", "multilabel", ("a", "b", "c")),
        Task("flag", "binary", ("false", "true")),
        Task("score", "regression"),
    ]
    ckpt = make_checkpoint(tmp_path, tasks)
    assert output_columns(tasks) == [
        "prediction_label",
        "confidence_label",
        "probabilities_label",
        "prediction_tags",
        "confidence_tags",
        "probabilities_tags",
        "prediction_flag",
        "confidence_flag",
        "probabilities_flag",
        "prediction_score",
    ]
    schema = output_schema(tasks)
    assert schema.field("prediction_tags").type == pa.list_(pa.string())
    assert schema.field("prediction_score").type == pa.float64()
    out = Predictor(str(ckpt), StorageConfig())(preprocessed(ckpt, make_rows(5, seed=6)))
    table = pa.table({c: pa.array(list(out[c])) for c in schema.names}).cast(schema)
    assert table.num_rows == 5
    for row in table.to_pylist():
        assert set(row["prediction_tags"]) <= {"a", "b", "c"} and len(row["probabilities_tags"]) == 3
        assert row["prediction_flag"] in ("false", "true") and sum(row["probabilities_flag"]) == pytest.approx(1)
        assert isinstance(row["prediction_score"], float)


def test_evaluate_keeps_encoded_labels_and_logits_but_never_quarantines_for_a_label(tiny_checkpoint):
    rows = make_rows(4, seed=7)
    rows["label"][0], rows["label"][1] = "unicorn", None
    batch = preprocessed(tiny_checkpoint, rows, label_tasks=[TASK])
    out = Predictor(str(tiny_checkpoint), StorageConfig(), evaluate=True)(batch)
    assert list(out[ERROR]) == [""] * 4  # a bad label is not a bad row: every row is scored
    assert "not in the label map" in out[LABEL_ERROR][0] and "null label" in out[LABEL_ERROR][1]
    assert list(out[LABEL_ERROR][2:]) == ["", ""]
    assert [CLASSES[i] for i in out[label_key("label")][2:]] == rows["label"][2:]
    assert all(len(v) == 4 for v in out[logits_key("label")])


@pytest.mark.integration  # two real predictor actors on the session's Ray (each imports torch)
def test_checkpoint_on_s3_is_fetched_by_each_actor_and_cleaned_up(
    tiny_checkpoint, s3_server, s3_bucket, ray_session, tmp_path, monkeypatch
):
    """Each actor downloads the checkpoint itself (actors on any node need no shared storage), checks its
    hash, predicts exactly what a local load predicts, and leaves no download behind.

    Each actor gets its own access key id (the S3 server accepts any) and its own TMPDIR, so the server's
    request log says which actor fetched what, and its temp directory shows what it left.
    """
    import requests

    store = StorageConfig(s3_endpoint_url=s3_server)
    uri = f"s3://{s3_bucket}/ckpt"
    storage.copy_dir_to(tiny_checkpoint, uri, store)
    batch = preprocessed(tiny_checkpoint, make_rows(4, seed=8))
    want = Predictor(str(tiny_checkpoint), StorageConfig())(batch)

    monkeypatch.chdir(tmp_path)  # moto writes its request recording to ./moto_recording
    api = f"{s3_server}/moto-api/recorder"
    requests.post(f"{api}/reset-recording", timeout=30).raise_for_status()
    requests.post(f"{api}/start-recording", timeout=30).raise_for_status()
    actors, temp_dirs = [], []
    try:
        for i in range(2):
            temp_dirs.append(tmp_path / f"actor{i}-tmp")
            temp_dirs[-1].mkdir()
            os.utime(temp_dirs[-1], ns=(0, 0))  # any entry made (or removed) in it moves its mtime
            env = {"AWS_ACCESS_KEY_ID": f"ACTOR{i}KEY", "TMPDIR": str(temp_dirs[-1])}
            actor_class = ray_session.remote(Predictor).options(num_cpus=0.1, runtime_env={"env_vars": env})
            actors.append(actor_class.remote(uri, store, model_id(tiny_checkpoint)))
        outs = ray_session.get([a.__call__.remote(batch) for a in actors], timeout=300)
        pids = ray_session.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in actors], timeout=60)
    finally:
        requests.post(f"{api}/stop-recording", timeout=30)
        for a in actors:
            ray_session.kill(a)
    recording = [json.loads(line) for line in requests.get(f"{api}/download-recording", timeout=30).text.splitlines()]

    assert len(set(pids)) == 2 and os.getpid() not in pids  # two actor processes, not this one
    for i, out in enumerate(outs):
        assert list(out["prediction"]) == list(want["prediction"])
        np.testing.assert_allclose(np.stack(out["probabilities"]), np.stack(want["probabilities"]), rtol=0, atol=1e-6)
        fetched = {
            r["url"].split("?")[0].rsplit("/ckpt/", 1)[-1]
            for r in recording
            if r["method"] == "GET" and f"Credential=ACTOR{i}KEY/" in r["headers"].get("Authorization", "")
        }
        assert {"mmray.json", "model.safetensors", f"{TOKENIZER_DIR}/tokenizer.json"} <= fetched, (i, fetched)
        assert temp_dirs[i].stat().st_mtime_ns > 0, f"actor {i} never used its TMPDIR"  # the download was there
        assert list(temp_dirs[i].iterdir()) == [], f"actor {i} left {list(temp_dirs[i].iterdir())}"  # and is gone


def test_a_non_finite_vector_quarantines_its_row_unless_it_is_a_missing_modalitys(tiny_checkpoint):
    """``embed`` quarantines a row whose fused or present-modality vector is not finite (stage
    ``predict``, every vector null); a NaN in the vector of a modality the row lacks is never written,
    so it is no reason to drop the row."""
    rows = make_rows(5, seed=9)
    rows["text"][4] = None  # no text: its text vector is not written
    batch = preprocessed(tiny_checkpoint, rows)
    embed = Predictor(str(tiny_checkpoint), StorageConfig(), row_kind="embeddings")
    model = embed.model

    def poisoned(inputs):
        out = model(inputs)
        out["fused"][1] = float("nan")  # row 1: its fused vector
        out["pooled"][TEXT][2] = float("inf")  # row 2: its text vector, and it has text
        out["pooled"][TEXT][4] = float("nan")  # row 4: the text vector of a row without text
        return out

    embed.model = poisoned
    out = embed(batch)
    assert list(out[ERROR]) == ["", "non-finite embedding", "non-finite embedding", "", ""]
    assert [out[ERROR_STAGE][i] for i in (1, 2)] == ["predict", "predict"]
    for i in (1, 2):
        assert all(out[c][i] is None for c in ("fused", TEXT, IMAGE)), i
    assert out[TEXT][4] is None and len(out["fused"][4]) == len(out["fused"][0])  # kept, text null
    assert all(np.isfinite(out["fused"][i]).all() for i in (0, 3, 4))
