"""Typed, frozen configuration for mmray, loaded from YAML plus dotted ``key=value`` overrides.

Every knob of a run lives here, once. Builders (``mmray.models.builder``, ``mmray.data.preprocess``,
``mmray.train.launcher``) unpack the sections they need; no ``nn.Module`` ever sees a config object.

Example:
    cfg = load_config("configs/demo.yaml", ["train.epochs=3", "model.fusion=gated"])

Values are validated where they enter: an unknown key, a wrong type or an out-of-range value raises
``ConfigError`` naming the dotted key. Pydantic checks each value against its field's annotation, range
included (``PositiveInt``, ``Fraction`` ...; the dataclasses stay plain: workers, checkpoints and tests
build and pickle them as such); the rules between keys are ``_validate``'s.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from annotated_types import Ge, Gt, Interval

__all__ = [
    "AlignConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EarlyStoppingConfig",
    "ImageConfig",
    "ImageEncoderConfig",
    "ModelConfig",
    "PreprocessConfig",
    "ScoreConfig",
    "StorageConfig",
    "TextConfig",
    "TextEncoderConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "flatten",
    "load_config",
    "load_yaml",
    "set_dotted",
]


class ConfigError(ValueError):
    """A config key is unknown, mistyped or out of range; the message names the dotted key."""


# Value ranges, stated in the annotation and checked by pydantic with the types. annotated_types is
# pydantic's own vocabulary for them, and light: importing the config still imports no pydantic.
PositiveInt = Annotated[int, Gt(0)]
PositiveFloat = Annotated[float, Gt(0)]
NonNegativeInt = Annotated[int, Ge(0)]
NonNegativeFloat = Annotated[float, Ge(0)]
Fraction = Annotated[float, Interval(ge=0, le=1)]
Freeze = Annotated[bool | int, Ge(0)]  # an encoder's freeze: true, false or N blocks (bools are 0/1)
TaskKind = Literal["multiclass", "multilabel", "binary", "regression"]


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StorageConfig:
    s3_endpoint_url: str | None = None  # S3-compatible stores (MinIO, moto); None = AWS default
    s3_region: str | None = None  # None = the AWS chain's region (env, profile)


@dataclass(frozen=True)
class PreprocessConfig:
    concurrency: PositiveInt = 1  # preprocessing actors in the pool
    batch_size: PositiveInt = 64  # rows per map_batches call
    num_cpus: float = 0.5  # CPUs reserved per actor; fractional so small machines never deadlock
    fetch_threads: PositiveInt = 8  # concurrent image-URI reads per actor (S3 latency, not CPU, bounds them)
    fetch_attempts: PositiveInt = 3  # tries per image URI on transient errors (exponential backoff)
    fetch_timeout_s: PositiveFloat = 30.0  # one image fetch, all attempts; a slower one is quarantined


@dataclass(frozen=True)
class TextConfig:
    max_length: PositiveInt = 32  # tokens after truncation, special tokens included
    nfkc: bool = True  # Unicode NFKC before tokenizing (full-width -> ASCII, ligatures ...)
    lowercase: bool = False
    stopwords: str | None = None  # None | "en" | "zh" | "en+zh" | path to a one-word-per-line file
    # "jieba": Chinese runs are cut into words (jieba's bundled dictionary, offline) before stopword
    # removal and tokenising, so multi-character stopwords match and WordPiece learns whole words.
    segmenter: Literal["none", "jieba"] = "none"
    user_dict: str | None = None  # jieba user dictionary ("word [freq] [tag]" per line); path or s3://
    # Part-of-speech tag per token (Universal POS), fed to the text encoder as a learned embedding:
    # Chinese (any CJK character in the row) by jieba.posseg, other rows by the spaCy pipeline pos_model
    # (spaCy is optional: pip install spacy + the model), or by jieba.posseg when pos_model is null.
    pos_tags: bool = False
    pos_model: str | None = None  # installed spaCy pipeline name or directory, e.g. "en_core_web_sm"
    vocab_size: PositiveInt = 4000  # only for the WordPiece tokenizer trained when no tokenizer is given
    # A row's text is cut to max_chars characters before normalising and tokenising (max_length
    # tokens never need more); text above max_bytes (UTF-8) is quarantined, naming its size.
    max_chars: PositiveInt = 20_000
    max_bytes: PositiveInt = 1 << 20


@dataclass(frozen=True)
class ImageConfig:
    size: PositiveInt = 32  # square side after resize + center crop
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Decompression-bomb guard: pixels an image may decode to (JPEG: at its draft scale). None:
    # max(4096^2, (16 * size)^2), which bounds one decode to ~64 MB at 4 bytes a pixel.
    max_pixels: PositiveInt | None = None
    max_bytes: PositiveInt = 32 << 20  # encoded image size (inline bytes, or a URI's stat size before reading)
    augment: bool = False  # random resized crop + horizontal flip, training only

    @property
    def pixel_limit(self) -> int:
        return self.max_pixels if self.max_pixels is not None else max(4096**2, (16 * self.size) ** 2)


@dataclass(frozen=True)
class DataConfig:
    train: str | None = None  # Parquet file, folder or glob; local path or s3://
    val: str | None = None
    test: str | None = None
    id_column: str = "id"
    text_column: str = "text"
    image_column: str | None = "image"  # image bytes; None when images come by URI only
    image_uri_column: str | None = None  # local path or s3:// URI per row
    # Local directories image URIs may be read from (s3:// is always allowed). None: no local path
    # is read, so a URI column cannot make an actor read /etc/passwd, a FIFO or /dev/zero.
    image_uri_roots: list[str] | None = None
    label_column: str | list[str] = "label"  # a list means one head per task
    missing_modality: Literal["allow", "quarantine"] = "allow"
    max_bad_fraction: Fraction = 0.1  # abort when more rows than this are quarantined
    # Keep the preprocessed splits in the object store ("always"), stream them, re-preprocessing every
    # epoch ("never"), or cache when they fit ("auto"). "features": with both encoders frozen
    # (freeze: true), run them once, in an actor pool after preprocessing, and cache their outputs
    # (float32) instead of pixels and tokens; every epoch then trains only fusion and heads on them.
    cache: Literal["auto", "always", "never", "features"] = "auto"
    cache_max_fraction: Fraction = 0.3  # "auto" caches when it fits in this share of the object store
    # Seconds a Ray Data execution (scoring's stream, training's preprocessing passes and the trainer
    # workers' ingest) may go without any stage moving a block before the job fails with Ray Data's
    # stage summary: a stage that can never be scheduled or a UDF that blocks. Raise it when one
    # batch (a model load, a slow image fetch, one training step) can take longer; 0 disables it.
    stall_timeout_s: NonNegativeFloat = 300.0
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image: ImageConfig = field(default_factory=ImageConfig)

    @property
    def label_columns(self) -> list[str]:
        return [self.label_column] if isinstance(self.label_column, str) else list(self.label_column)


@dataclass(frozen=True)
class TextEncoderConfig:
    kind: Literal["tiny", "hf"] = "tiny"
    name: str | None = None  # hf: hub id, local dir or s3:// dir
    tokenizer: str | None = None  # hub id / dir; None: hf uses `name`, tiny trains a WordPiece
    dim: PositiveInt = 64  # tiny only; hf derives it from the model
    layers: PositiveInt = 1  # tiny only
    heads: PositiveInt = 4  # tiny only
    pooling: Literal["cls", "mean"] = "mean"  # mean suits sentence-transformers models (MiniLM)
    freeze: Freeze = False  # True, False, or N = train only the last N blocks (and what follows them)


@dataclass(frozen=True)
class ImageEncoderConfig:
    kind: Literal["tiny", "torchvision"] = "tiny"
    name: str = "resnet18"  # torchvision.models builder name
    weights: str | None = None  # local file, s3:// file, or a torchvision weights name
    dim: PositiveInt = 64  # tiny only; torchvision derives it from the model
    # tiny only: 3x3 convolutions per stage (3 stages). One sees ~22 px at 32 px input: enough for
    # colour, too little for shapes or counting small objects, where 2 is far better but learns simple
    # cues more slowly (bench/RESULTS.md).
    convs_per_stage: PositiveInt = 1
    freeze: Freeze = False  # True, False, or N = train only the last N blocks (ResNet: stages)


@dataclass(frozen=True)
class AlignConfig:
    # Image-text alignment before fusion (ITC: CLIP; ALBEF's "align before fuse"): a symmetric InfoNCE
    # loss between the projected pooled text and image vectors of the true caption-image pairs, added to
    # the task loss with this weight; 0 = off. Under DDP the negatives come from every worker's pairs.
    # It teaches each encoder what the other modality tells apart, which an interaction-only label
    # cannot (bench/RESULTS.md, issue 11 item 9). When on, the task heads of every fusion but `late`
    # also read each row's aligned cosine similarity (0 where a row lacks a modality); `late` stays an
    # average of per-modality logits, which a cross-modal similarity would break.
    weight: NonNegativeFloat = 0.0
    # Which rows are true pairs: "all" (every row's caption describes its image) or "TASK=VALUE" (only
    # rows whose TASK label is VALUE, e.g. "label=yes" for a caption-matching task). Off by default,
    # as most tasks' captions do not describe their images (`sum`, `classify`).
    pairs: str = "all"
    projection_dim: PositiveInt = 64  # width of the shared space both pooled vectors are projected into
    # initial softmax temperature; learned from there (CLIP's init 0.07), clamped at >= 0.01 as CLIP does
    temperature: PositiveFloat = 0.07
    # Image-text matching (ALBEF's ITM) with this weight; 0 = off; needs `weight` > 0 and a fusion other
    # than `late`. For each true pair of a batch, one hard negative image and one hard negative caption
    # are drawn from the worker's batch in proportion to their aligned similarity (never the pair itself
    # or a pair of the same caption) and run through the configured fusion with a binary matching head:
    # it teaches the fusion the fine distinctions that in-batch contrast leaves (one attribute apart).
    itm_weight: NonNegativeFloat = 0.0


@dataclass(frozen=True)
class ModelConfig:
    fusion: Literal["concat", "gated", "cross_attention", "bilinear", "late"] = "concat"
    hidden_dim: PositiveInt = 128  # fusion output width
    dropout: Fraction = 0.1
    modality_dropout: Fraction = 0.0  # per-sample probability of dropping a whole modality (training)
    # Unimodal auxiliary heads (gradient blending); 0 turns them off. Off by default: where a modality
    # alone is weak (interactions, additive labels) their loss only adds noise (bench/RESULTS.md).
    aux_loss_weight: NonNegativeFloat = 0.0
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    tasks: dict[str, TaskKind] = field(default_factory=dict)  # label column -> its kind
    loss_weights: dict[str, NonNegativeFloat] = field(default_factory=dict)  # label column -> weight (default 1)
    fusion_layers: PositiveInt = 2  # cross_attention: rounds of text <-> image attention
    fusion_heads: PositiveInt = 4  # cross_attention: attention heads; must divide hidden_dim
    fusion_rank: PositiveInt = 4  # bilinear: rank of the low-rank factors (LMF)
    align: AlignConfig = field(default_factory=AlignConfig)
    # A checkpoint (local or s3://; e.g. from `mmray pretrain`) whose encoders and alignment projection
    # this run starts from; its fusion, task heads and matching head start fresh, `freeze` applies as
    # usual. The encoder and alignment settings must equal the checkpoint's (the run checks, naming each
    # key), and the tiny text encoder keeps the checkpoint's tokenizer (its rows index that vocabulary).
    init_from: str | None = None


@dataclass(frozen=True)
class EarlyStoppingConfig:
    metric: str | None = None  # e.g. "val_loss" or "val_accuracy"; None = off
    patience: PositiveInt = 3
    mode: Literal["min", "max"] = "min"


@dataclass(frozen=True)
class TrainConfig:
    epochs: PositiveInt = 3
    batch_size: PositiveInt = 32  # per worker
    lr: PositiveFloat = 3e-3  # fusion + heads, for a global batch of lr_reference_batch rows (see lr_scaling)
    encoder_lr: float | None = None  # encoders; None = lr (scaled the same way)
    # Global batch = batch_size x num_workers x grad_accum_steps. "sqrt" (AdamW's usual rule) multiplies
    # both rates by sqrt(global / lr_reference_batch), "linear" by global / lr_reference_batch.
    lr_scaling: Literal["none", "sqrt", "linear"] = "sqrt"
    lr_reference_batch: PositiveInt = 64
    weight_decay: float = 0.01
    warmup_fraction: Fraction = 0.05
    label_smoothing: Fraction = 0.0  # training loss only (classification heads); reported losses stay raw
    grad_accum_steps: PositiveInt = 1
    grad_clip: PositiveFloat | None = 1.0  # None = no clipping
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    num_workers: PositiveInt = 1
    use_gpu: bool = False
    resources_per_worker: dict[str, NonNegativeFloat] = field(default_factory=lambda: {"CPU": 0.5})
    seed: int = 0
    storage_path: str = "./runs"
    name: str | None = None  # None: a fresh unique name; reusing a name resumes that run
    resume_from: str | None = None  # a checkpoint directory to start from
    max_failures: Annotated[int, Ge(-1)] = 0  # worker-group restarts before the run fails; -1 = retry forever
    # "package.module:function", imported on every training worker and called as fn(rank, epoch, step)
    # before each optimizer step: profilers, custom logging, fault drills. The module must be importable
    # on the workers (installed, or shipped with the job's working_dir / py_modules).
    before_step: str | None = None
    num_to_keep: PositiveInt = 2  # checkpoints kept, best by checkpoint_metric
    checkpoint_metric: str = "val_loss"
    checkpoint_mode: Literal["min", "max"] = "min"
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    prefetch_batches: NonNegativeInt = 2  # batches each worker prefetches from its dataset shard
    tensorboard_dir: str | None = None  # rank 0 writes scalars to <dir>/<run name>; needs tensorboard(X)
    # log params + epoch metrics to MLflow (needs mlflow): a server (http://host:5000), a database
    # (sqlite:///mlruns.db, needs SQLAlchemy) or a file store (file:///abs/mlruns or ./mlruns), for which
    # mmray sets MLFLOW_ALLOW_FILE_STORE=true in the tracking process (MLflow 3 refuses it otherwise)
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "mmray"


@dataclass(frozen=True)
class ScoreConfig:
    concurrency: PositiveInt = 1  # predictor actors
    batch_size: PositiveInt = 128
    num_gpus: NonNegativeFloat = 0.0  # per predictor actor
    num_cpus: NonNegativeFloat = 0.5  # per predictor actor
    rows_per_file: PositiveInt = 100_000  # rows per committed output file (the last one smaller)
    # "fused": one pool of data.preprocess.concurrency + score.concurrency actors that each read,
    # preprocess and predict (on CPU a second pool only adds processes and copies); "split": a
    # preprocessing pool feeding a predictor pool (a GPU predictor fed by CPU decoders); "auto": fused
    # unless score.num_gpus > 0. Either way a small input starts fewer actors (mmray/score/pools.py).
    pools: Literal["auto", "fused", "split"] = "auto"
    # Nightly job (jobs/nightly_score.py): scores <input>/date=D into <output>/date=D.
    checkpoint: str | None = None  # None: the `checkpoint` in <train.storage_path>/latest.json
    input: str | None = None  # root holding date=YYYY-MM-DD partitions; local path or s3://
    output: str | None = None


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    # Read by pydantic when config_from_dict checks types, and inherited by every section: an unknown
    # key is an error, never silently dropped. A plain dict, so importing the config imports no pydantic.
    __pydantic_config__: ClassVar[dict[str, str]] = {"extra": "forbid"}


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------


@functools.cache
def _validator() -> Any:
    """Pydantic's validator for ``Config``, built on first use, so that the commands which load a
    config pay for importing pydantic and building the schema, not every ``import mmray.config``.

    Scalars are checked strictly: pydantic's lax mode would take ``"3"``, ``3.0`` or ``true`` for an
    int, ``"yes"`` or ``1`` for a bool, ``true`` for a float. Strict mode cannot be set for the whole
    config (it takes only instances for the sections, no mappings; only tuples for tuples, where YAML
    gives lists), so it is set on each scalar of the schema.
    """
    from pydantic import TypeAdapter
    from pydantic_core import SchemaValidator

    return SchemaValidator(_strict_scalars(TypeAdapter(Config).core_schema))


def _strict_scalars(schema: Any) -> Any:
    """A copy of a pydantic core schema with every int, bool, str and float strict; a float also takes
    a numeric string, as YAML 1.1 reads ``1e-4`` (no dot) as one."""
    if isinstance(schema, list):
        return [_strict_scalars(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {k: _strict_scalars(v) for k, v in schema.items()}
    if schema.get("type") in ("int", "bool", "str", "float"):
        schema["strict"] = True
    if schema.get("type") == "float":
        from pydantic_core import core_schema

        return core_schema.no_info_before_validator_function(_number_from_string, schema)
    return schema


def _number_from_string(value: Any) -> Any:
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value  # the float check rejects it, naming the key


def _empty_sections_as_defaults(cls: type, data: Any) -> None:
    """A section whose keys are all commented out reads as null in YAML: it means the defaults."""
    if not isinstance(data, dict):
        return  # not a mapping: pydantic says so, naming the key
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if dataclasses.is_dataclass(hints.get(name)):
            data[name] = {} if value is None else value
            _empty_sections_as_defaults(hints[name], data[name])


_OUT_OF_RANGE = ("greater_than", "greater_than_equal", "less_than_equal")  # pydantic's, for Gt, Ge, Interval


def _type_error(error: Any, data: dict) -> str:
    """One of pydantic's errors as a message naming the dotted key (list items as ``key[0]``), what
    the key takes (its type, or its range for a value of the right type) and the value given, found by
    walking the error's location through the annotations."""
    loc, what = error["loc"], None
    if loc[-1:] == ("[key]",):  # a mapping's key, not its value, has the wrong type
        loc, what = loc[:-2], f"string keys, got {loc[-2]!r}"
    elif error["type"] == "missing":  # a list too short for a tuple: pydantic names its first absent item
        loc = loc[:-1]
    key, tp, value = "", Config, data
    for part in loc:
        tp = _unannotated(tp)
        arms = [arm for arm in typing.get_args(tp) if arm is not type(None)]
        if typing.get_origin(tp) in (Union, types.UnionType):
            if len(arms) > 1:
                break  # pydantic names the member it tried next: the value fits none, report the union
            tp = _unannotated(arms[0])  # X | None: the error is X's
        if dataclasses.is_dataclass(tp):
            name, known = f"{key}.{part}" if key else str(part), sorted(f.name for f in dataclasses.fields(tp))
            if part not in known:
                return f"unknown config key '{name}' (known: {known})"
            key, tp = name, typing.get_type_hints(tp, include_extras=True)[part]
        elif typing.get_origin(tp) is dict:
            key, tp = f"{key}.{part}", typing.get_args(tp)[1]
        else:  # a list's or a tuple's item
            items = typing.get_args(tp)
            key, tp = f"{key}[{part}]", items[part] if typing.get_origin(tp) is tuple else items[0]
        value = value[part]
    if error["type"] in _OUT_OF_RANGE:
        base, bound = _range(tp)
        value = float(error["input"]) if base is float else error["input"]  # as the key holds it: YAML's 2 as 2.0
        return f"{key}: must be {bound}, got {value!r}"
    return f"{key or 'config'}: expected {what or f'{_expected(tp)}, got {value!r}'}"


def _unannotated(tp: Any) -> Any:
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


def _range(tp: Any) -> tuple[Any, str]:
    """The type a ranged annotation (``PositiveInt``, ``Fraction | None`` ...) constrains, and its range
    in words: ``> 0``, ``>= 0``, ``within [0, 1]``, with ``or null`` where None is allowed."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        ((base, bound),) = (_range(arm) for arm in typing.get_args(tp) if arm is not type(None))
        return base, f"{bound} or null"
    base, bound = typing.get_args(tp)
    if isinstance(bound, Interval):
        return base, f"within [{bound.ge}, {bound.le}]"
    return base, f"> {bound.gt}" if isinstance(bound, Gt) else f">= {bound.ge}"


_YAML_NAMES = {
    bool: "true/false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    type(None): "null",
}


def _expected(tp: Any) -> str:
    """What a value of annotation ``tp`` is, in YAML's words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:  # a range: the type is what a value of the wrong type is told
        return _expected(args[0])
    if origin in (Union, types.UnionType):
        return " or ".join(_expected(arg) for arg in args)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin is tuple:
        return f"a list of {len(args)} values"
    return _YAML_NAMES.get(origin or tp, "a mapping")  # or a section


def _validate(cfg: Config) -> None:
    """The rules no single field's annotation can state: between keys, and on the form of a string."""
    if cfg.data.image_column is None and cfg.data.image_uri_column is None:
        raise ConfigError("data.image_column / data.image_uri_column: at least one must be set")
    for root in cfg.data.image_uri_roots or ():
        if "://" in root or not root.startswith("/"):
            raise ConfigError(
                f"data.image_uri_roots: {root!r} must be an absolute local directory "
                "(s3:// image URIs are always allowed)"
            )
    # Credentials never live in a config: it is logged (MLflow params), copied and stored in checkpoints.
    endpoint = cfg.storage.s3_endpoint_url
    if endpoint and _embeds_credentials(endpoint if "://" in endpoint else f"https://{endpoint}"):  # a bare host
        raise ConfigError(
            "storage.s3_endpoint_url: must not embed credentials (user:password@host); "
            "S3 credentials come from the AWS chain"
        )
    if _embeds_credentials(cfg.train.mlflow_tracking_uri):
        raise ConfigError(
            "train.mlflow_tracking_uri: must not embed credentials (user:password@host); "
            "use MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN"
        )
    if cfg.data.cache == "features":
        _check_feature_cache(cfg)
    if cfg.data.text.pos_model and not cfg.data.text.pos_tags:
        raise ConfigError("data.text.pos_model: set, but data.text.pos_tags is false (nothing would use it)")
    if cfg.data.text.user_dict and cfg.data.text.segmenter != "jieba" and not cfg.data.text.pos_tags:
        raise ConfigError(
            "data.text.user_dict: only jieba reads it: set data.text.segmenter=jieba (or data.text.pos_tags=true)"
        )
    if cfg.model.text_encoder.kind == "hf" and not cfg.model.text_encoder.name:
        raise ConfigError("model.text_encoder.name: required when model.text_encoder.kind is 'hf'")
    hook = cfg.train.before_step
    if hook is not None and (
        hook.count(":") != 1 or not all(part.replace(".", "_").isidentifier() for part in hook.split(":"))
    ):
        raise ConfigError(f"train.before_step: {hook!r} is not 'package.module:function'")
    if cfg.model.align.itm_weight > 0 and cfg.model.align.weight <= 0:
        raise ConfigError(
            "model.align.itm_weight: needs model.align.weight > 0 (its negatives come from the alignment)"
        )
    if cfg.model.align.itm_weight > 0 and cfg.model.fusion == "late":
        raise ConfigError("model.align.itm_weight: late fusion cannot match text to image (it never combines them)")
    pairs = cfg.model.align.pairs
    if pairs != "all" and (pairs.count("=") != 1 or not all(part.strip() for part in pairs.split("="))):
        raise ConfigError(f"model.align.pairs: {pairs!r} is neither 'all' nor 'TASK=VALUE' (e.g. 'label=yes')")
    if cfg.model.text_encoder.dim % cfg.model.text_encoder.heads:
        raise ConfigError("model.text_encoder.dim: must be divisible by model.text_encoder.heads")
    if cfg.model.fusion == "cross_attention" and cfg.model.hidden_dim % cfg.model.fusion_heads:
        raise ConfigError(
            f"model.fusion_heads: {cfg.model.fusion_heads} must divide model.hidden_dim={cfg.model.hidden_dim}"
        )


def _check_feature_cache(cfg: Config) -> None:
    """``data.cache=features`` computes each encoder's output once: nothing may change it between epochs."""
    text, image = cfg.model.text_encoder.freeze, cfg.model.image_encoder.freeze
    if text is not True or image is not True:  # an int N trains the last N blocks; 0 reads as "set true"
        raise ConfigError(
            "data.cache=features needs model.text_encoder.freeze: true and model.image_encoder.freeze: true "
            f"(got {text!r} and {image!r}): a trainable encoder's outputs change every step"
        )
    if cfg.data.image.augment:
        raise ConfigError(
            "data.image.augment: augments the pixels every epoch, but data.cache=features encodes them once "
            "(set it false, or data.cache=always)"
        )
    if cfg.data.text.pos_tags:
        raise ConfigError(
            "data.text.pos_tags: its POS embedding trains inside the frozen text encoder, so the encoder's "
            "outputs change every step; data.cache=features needs it false (or data.cache=always)"
        )


def _embeds_credentials(uri: str | None) -> bool:
    """True for ``scheme://user:secret@host`` with ANY ``@`` after the scheme: a secret may hold ``/``,
    so the authority cannot be trusted to end at the first slash. Local paths (no scheme, ``file://``)
    have no user-info."""
    scheme, sep, rest = (uri or "").partition("://")
    return bool(sep) and scheme.lower() != "file" and "@" in rest


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested mapping by dotted key, ``{"a": {"b": 1}}`` as ``{"a.b": 1}``: what overrides and MLflow
    params name. An empty mapping stays the value of its own key (``model.tasks: {}``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _apply_override(data: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected dotted.key=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
    set_dotted(data, key, _deepcopy(value, key))


def set_dotted(data: dict, key: str, value: Any) -> None:
    """Sets ``a.b.c`` in nested plain mappings, creating the missing levels (overrides, tune trials)."""
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {key}")
        node = child
    node[parts[-1]] = value


def config_from_dict(data: dict | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Builds and validates a Config from a plain mapping plus dotted overrides.

    Args:
        data: nested mapping, as loaded from YAML.
        overrides: ``dotted.key=value`` strings; values are parsed as YAML scalars/lists.

    Returns:
        The frozen, validated Config.
    """
    data = _deepcopy(data or {})
    for o in overrides:
        _apply_override(data, o)
    _empty_sections_as_defaults(Config, data)
    from pydantic import ValidationError  # here, not above: see _validator

    try:
        cfg = _validator().validate_python(data)
    except ValidationError as e:
        # Every bad key at once; pydantic reports a value that fits no member of a union once per member.
        raise ConfigError("; ".join(dict.fromkeys(_type_error(err, data) for err in e.errors()))) from None
    _validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Loads a YAML config file (or defaults when ``path`` is None) and applies overrides."""
    data: dict = {}
    if path is not None:
        data = load_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    return config_from_dict(data, overrides)


def load_yaml(path: str | Path) -> Any:
    """A YAML file's plain data, with every alias expanded into a copy of at most ``MAX_CONFIG_VALUES``.

    Raises:
        ConfigError: not valid YAML, or it expands past the bound; naming the file.
    """
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return _deepcopy(data, str(path))


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON and for ``config_from_dict``."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


# A config holds hundreds of values. YAML aliases share one node many times, so a 470-byte file of ten
# nested x10 aliases loads cheaply and expands to 10^10 values when copied or validated: count them
# while copying and stop there (a copy is what every later step reads).
MAX_CONFIG_VALUES = 100_000


def _deepcopy(d: Any, where: str = "config", seen: list[int] | None = None) -> Any:
    """A copy of nested mappings and lists that refuses to expand past ``MAX_CONFIG_VALUES`` values.

    Raises:
        ConfigError: naming ``where`` (the file or the override).
    """
    seen = seen if seen is not None else [0]
    seen[0] += 1
    if seen[0] > MAX_CONFIG_VALUES:
        raise ConfigError(
            f"{where}: expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases of aliases?); refusing it"
        )
    if isinstance(d, dict):
        return {k: _deepcopy(v, where, seen) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v, where, seen) for v in d]
    return d
