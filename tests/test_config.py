"""Config: YAML + dotted overrides, typed and frozen; errors name the key."""

from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path

import pytest
import yaml

from mmray.config import Config, ConfigError, config_from_dict, config_to_dict, flatten, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_have_the_required_keys():
    cfg = Config()
    assert (cfg.data.id_column, cfg.data.text_column, cfg.data.image_column, cfg.data.label_column) == (
        "id",
        "text",
        "image",
        "label",
    )
    assert cfg.model.fusion == "concat"
    assert cfg.train.storage_path == "./runs" and cfg.train.name is None


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    """Every value the file sets is the value the run gets (nothing dropped, renamed or defaulted over),
    and the typed config survives the dict round trip that checkpoints and MLflow params use."""
    cfg = load_config(path)
    loaded = config_to_dict(cfg)

    def leaves(d: dict, prefix: str = ""):
        for k, v in d.items():
            if isinstance(v, dict) and k != "resources_per_worker":
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    written = dict(leaves(yaml.safe_load(path.read_text())))
    assert written, path
    for key, value in written.items():
        got = loaded
        for part in key.split("."):
            got = got[part]
        assert got == value, f"{path.name}: {key} is {got!r}, the file says {value!r}"
    assert config_from_dict(loaded) == cfg


def test_overrides_parse_yaml_scalars_and_nest():
    cfg = load_config(
        None,
        [
            "train.epochs=7",
            "train.lr=1e-4",
            "train.use_gpu=true",
            "model.fusion=gated",
            "data.label_column=[a, b]",
            "train.resources_per_worker={CPU: 1, GPU: 1}",
        ],
    )
    assert cfg.train.epochs == 7 and cfg.train.lr == pytest.approx(1e-4) and cfg.train.use_gpu is True
    assert cfg.model.fusion == "gated"
    assert cfg.data.label_columns == ["a", "b"]
    assert cfg.train.resources_per_worker == {"CPU": 1.0, "GPU": 1.0}
    assert all(type(v) is float for v in (cfg.train.lr, *cfg.train.resources_per_worker.values()))  # YAML ints


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().train.epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epoch=3", "train.epoch"),
        ("model.text_encoder.nme=x", "model.text_encoder.nme"),
        ("train.epochs=three", "train.epochs"),
        ("train.epochs=0", "train.epochs"),
        ("model.fusion=sum", "model.fusion"),
        ("model.dropout=1.5", "model.dropout"),
        ("train.use_gpu=maybe", "train.use_gpu"),
        ("data.image.mean=[0.5, 0.5]", "data.image.mean: expected a list of 3 values, got [0.5, 0.5]"),
        ("data.image.mean=[0.5, x, 0.5]", "data.image.mean[1]: expected a number, got 'x'"),
        # No guessing: a quoted number, a float or a bool is not an int, 1 is not true, true is not a number.
        ("train.epochs='3'", "train.epochs: expected an integer, got '3'"),
        ("train.epochs=3.0", "train.epochs: expected an integer, got 3.0"),
        ("train.epochs=true", "train.epochs: expected an integer, got True"),
        ("train.use_gpu=1", "train.use_gpu: expected true/false, got 1"),
        ("train.lr=true", "train.lr: expected a number, got True"),
        ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
        ("data.train=5", "data.train: expected a string or null, got 5"),
        ("data.label_column=[a, 2]", "data.label_column: expected a string or a list, got ['a', 2]"),
        ("data.image_uri_roots=[/ok, 2]", "data.image_uri_roots[1]: expected a string, got 2"),
        ("model.image_encoder.freeze=all", "model.image_encoder.freeze: expected true/false or an integer, got 'all'"),
        ("model.tasks={1: binary}", "model.tasks: expected string keys, got 1"),
        ("model.loss_weights={label: x}", "model.loss_weights.label: expected a number, got 'x'"),
        ("train=3", "train: expected a mapping, got 3"),
        ("model.tasks={label: ranking}", "model.tasks.label"),
        ("model.fusion_rank=0", "model.fusion_rank: must be > 0"),
        ("model.aux_loss_weight=-0.1", "model.aux_loss_weight: must be >= 0"),
        ("model.loss_weights={label: 1, tags: -2}", "model.loss_weights.tags: must be >= 0, got -2.0"),
        ("train.resources_per_worker={CPU: -1}", "train.resources_per_worker.CPU: must be >= 0"),
        ("model.image_encoder.freeze=-1", "model.image_encoder.freeze: must be >= 0"),
        ("score.num_gpus=-1", "score.num_gpus: must be >= 0"),
        ("data.text.max_chars=0", "data.text.max_chars: must be > 0"),
        ("data.image.max_bytes=-1", "data.image.max_bytes: must be > 0"),
        ("data.image.max_pixels=0", "data.image.max_pixels: must be > 0"),
        ("data.preprocess.fetch_timeout_s=0", "data.preprocess.fetch_timeout_s: must be > 0"),
        ("data.image_uri_roots=[images]", "data.image_uri_roots: 'images' must be an absolute local directory"),
        ("data.image_uri_roots=[/ok, s3://b/x]", "data.image_uri_roots: 's3://b/x' must be an absolute"),
        ("model.align.weight=-1", "model.align.weight: must be >= 0"),
        ("model.align.temperature=0", "model.align.temperature: must be > 0"),
        ("model.align.projection_dim=0", "model.align.projection_dim: must be > 0"),
        ("model.align.pairs=match", "model.align.pairs: 'match' is neither 'all' nor 'TASK=VALUE'"),
        ("model.align.pairs='label='", "model.align.pairs: 'label=' is neither"),
        ("model.align.itm_weight=-1", "model.align.itm_weight: must be >= 0"),
        ("model.align.itm_weight=1", "model.align.itm_weight: needs model.align.weight > 0"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, [override])


def test_matching_needs_alignment_and_a_fusion_that_combines():
    with pytest.raises(ConfigError, match="model.align.itm_weight: late fusion cannot match"):
        load_config(None, ["model.align.weight=1", "model.align.itm_weight=1", "model.fusion=late"])
    assert load_config(None, ["model.align.weight=1", "model.align.itm_weight=0.5"]).model.align.itm_weight == 0.5


def test_every_wrong_type_and_unknown_key_is_named_at_once():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"train": {"epochs": "x", "lr": 0.1, "learning_rate": 0.1}, "modle": {}})
    train_keys = sorted(f.name for f in dataclasses.fields(Config().train))
    assert str(e.value) == (
        "train.epochs: expected an integer, got 'x'; "
        f"unknown config key 'train.learning_rate' (known: {train_keys}); "
        "unknown config key 'modle' (known: ['data', 'model', 'score', 'storage', 'train'])"
    )


def test_out_of_range_values_are_named_at_once_with_the_wrong_types():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"train": {"epochs": 0, "lr": "x"}, "model": {"dropout": -1, "tasks": {"label": "rank"}}})
    assert str(e.value) == (
        "model.dropout: must be within [0, 1], got -1.0; "
        "model.tasks.label: expected one of ['multiclass', 'multilabel', 'binary', 'regression'], got 'rank'; "
        "train.epochs: must be > 0, got 0; "
        "train.lr: expected a number, got 'x'"
    )


# Counts, sizes, rates and timeouts: 0 would hang, divide by zero or do nothing; `or null` where null
# means derived (max_pixels) or off (grad_clip).
POSITIVE_KEYS = """
    data.preprocess.concurrency data.preprocess.batch_size data.preprocess.fetch_threads
    data.preprocess.fetch_attempts data.preprocess.fetch_timeout_s data.text.max_length data.text.vocab_size
    data.text.max_chars data.text.max_bytes data.image.size data.image.max_pixels data.image.max_bytes
    model.hidden_dim model.fusion_layers model.fusion_heads model.fusion_rank model.text_encoder.dim
    model.text_encoder.layers model.text_encoder.heads model.image_encoder.dim model.image_encoder.convs_per_stage
    model.align.projection_dim model.align.temperature train.epochs train.batch_size train.lr
    train.lr_reference_batch train.grad_accum_steps train.grad_clip train.num_workers train.num_to_keep
    train.early_stopping.patience score.concurrency score.batch_size score.rows_per_file
""".split()


@pytest.mark.parametrize("key", POSITIVE_KEYS)
def test_every_count_size_and_rate_refuses_zero_naming_the_key(key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: must be > 0( or null)?, got 0(\.0)?$"):
        load_config(None, [f"{key}=0"])


def test_malformed_override_is_rejected():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["train.epochs"])


def test_unknown_key_in_yaml_names_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 2\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        load_config(path)


def test_a_section_with_every_key_commented_out_is_the_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  # epochs: 2\nmodel:\n  image_encoder:\n")
    assert load_config(path) == Config()


def test_round_trip_through_dict_and_pickle():
    """Checkpoints and MLflow store the dict; Ray workers get the Config pickled."""
    cfg = load_config(None, ["model.fusion=late", "data.image.size=48", "data.label_column=[a, b]"])
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_flatten_names_every_leaf_by_its_dotted_key():
    flat = flatten(config_to_dict(load_config(None, ["model.loss_weights={label: 2}"])))
    assert flat["train.early_stopping.patience"] == 3 and flat["model.loss_weights.label"] == 2
    assert flat["model.tasks"] == {}  # an empty mapping is a value (an MLflow param), not dropped
    assert not any(isinstance(v, dict) and v for v in flat.values())


def test_text_preprocessing_keys_are_checked_together():
    cfg = config_from_dict({}, ["data.text.segmenter=jieba", "data.text.pos_tags=true", "data.text.user_dict=/d.txt"])
    assert (cfg.data.text.segmenter, cfg.data.text.pos_tags) == ("jieba", True)
    with pytest.raises(ConfigError, match="data.text.segmenter"):
        config_from_dict({}, ["data.text.segmenter=spacy"])
    with pytest.raises(ConfigError, match="data.text.pos_model: set, but data.text.pos_tags is false"):
        config_from_dict({}, ["data.text.pos_model=en_core_web_sm"])
    with pytest.raises(ConfigError, match="data.text.user_dict: only jieba reads it"):
        config_from_dict({}, ["data.text.user_dict=/d.txt"])


FROZEN = ["data.cache=features", "model.text_encoder.freeze=true", "model.image_encoder.freeze=true"]


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "model.text_encoder.freeze=false",
            "data.cache=features needs model.text_encoder.freeze: true and model.image_encoder.freeze: true "
            "(got False and True)",
        ),
        ("model.image_encoder.freeze=2", "(got True and 2)"),  # the last 2 stages train
        ("data.image.augment=true", "data.image.augment: augments the pixels every epoch"),
        ("data.text.pos_tags=true", "data.text.pos_tags: its POS embedding trains inside the frozen text encoder"),
    ],
)
def test_cached_features_refuse_whatever_changes_the_encoders_outputs(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [*FROZEN, override])


def test_cached_features_take_frozen_encoders_matching_and_modality_dropout():
    """Hard negatives recombine the batch's encoder outputs and modality dropout masks them after the
    encoders: neither re-encodes, so both work on cached features."""
    extra = ["model.align.weight=1", "model.align.itm_weight=0.5", "model.modality_dropout=0.2"]
    assert load_config(None, [*FROZEN, *extra]).data.cache == "features"


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(9)
)  # ten levels of x10: 10^10 values from ~470 bytes


def test_a_yaml_alias_bomb_is_refused_at_once_naming_the_file(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB + "train: {epochs: 1}\n")
    assert len(ALIAS_BOMB) < 600
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: expands to more than 100,000 values"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"train\.stopwords_bomb: expands to more than"):
        load_config(None, ["train.stopwords_bomb=" + ALIAS_BOMB.replace("\n", ", ").join("{}")])


def test_aliases_that_stay_small_still_load(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("data: {train: &split /data/all, val: *split}\n")
    cfg = load_config(path)
    assert cfg.data.train == cfg.data.val == "/data/all"


def test_the_cli_refuses_an_alias_bomb_in_one_line(tmp_path):
    from tests.helpers import run_cli

    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    proc = run_cli(["train", "--config", str(path)], check=False, timeout=60)  # it took all memory in 32 s
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith(f"{path}: expands to more than 100,000 values (YAML aliases of aliases?); refusing it")
    )
    assert "Traceback" not in proc.stderr
