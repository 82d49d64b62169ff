"""Batch scoring: Parquet in -> preprocessing pool -> predictor pool -> hidden staging -> committed output.

The same job writes predictions (``mmray score``) or the multimodal representation (``mmray embed``):
only the predictor's ``RowOutput`` and so the output schema differ; the steps below are the same.

1. The checkpoint is fetched once on the driver for its label maps, tokenizer and ``model_id`` (content
   hash); the input is listed, schema-checked and fingerprinted (paths, sizes, content: S3 ETags or
   Parquet footer hashes).
2. A commit of the same (input, model, settings, partition) at the target makes the run a no-op
   ("already scored"); a commit of a different one is replaced only with ``overwrite``.
3. The run takes the target's lease (another live run holding it: ``LeaseHeldError``, nothing done)
   and decides step 2 again under it: another run may have committed meanwhile.
4. Rows stream through the preprocessing and predictor actor pools into ``<staging>/_raw``.
5. ``finalize`` cuts sized part files with lineage, the quarantine and the metrics; the counts must
   reconcile with the input's Parquet metadata: ``rows_in == rows_scored + rows_quarantined``.
6. With more bad rows than ``data.max_bad_fraction``, the quarantine is written and the run fails
   without committing; otherwise, after checking that the lease is still held and the committed run
   is still the one seen in step 3, ``commit.publish`` makes the result visible (markers last).

Every input row ends up either in the output or in ``<target>/_quarantine/``.

``retry_quarantined`` re-scores only the committed quarantine's rows that failed for a reason another
attempt may fix (an image fetch that failed after its retries: network, throttling, 5xx, timeouts) and
publishes a new commit of the same partition: the previous files (kept as they are, with their
``run_id``), the newly scored rows in further files, and the quarantine of what still failed or was
never retryable. Counts add up as before; a rerun of it retries what is still transient. The input is
read again and the rows to retry are picked by id, so a row whose id another input row shares (scored
or quarantined) is not retried: it stays quarantined, and the run says how many (ids repeated in the
input are reported by the scoring run that finds them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import sys
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data

from mmray.checkpoint import open_checkpoint
from mmray.config import Config
from mmray.console import Ticker, bar, doing, format_count, format_duration, progress_interval
from mmray.data import pipeline, storage
from mmray.data.labels import Task
from mmray.data.preprocess import PreprocessSpec
from mmray.runtime import READ_TASKS, Demand, check_resources, failing_on_stall, guard_stalls, init_ray
from mmray.score import commit
from mmray.score.finalize import Finalized, finalize, repeated_ids
from mmray.score.label_metrics import LabelMetrics
from mmray.score.labeled import LabeledPreprocessor
from mmray.score.predictor import Predictor, RowOutput, row_output

__all__ = ["MANIFEST_FORMAT", "run_scoring"]

MANIFEST_FORMAT = 1
# Quarantine reasons another attempt may fix: preprocess's "image fetch failed: <uri>: <error>" is what an
# image read that exhausted data.preprocess.fetch_attempts leaves (not found / not allowed / too large differ).
RETRYABLE_PREFIX = "image fetch failed: "


@dataclasses.dataclass(frozen=True)
class _Retry:
    """What ``--retry-quarantined`` works from: the committed run and its quarantine, split."""

    manifest: dict
    ids: list[str]  # quarantined ids to score again: each names exactly one input row
    kept: pa.Table  # quarantine rows that stay (not retryable, or their id is on another row too)
    shared: int  # retryable rows kept because their id is not unique to them


def _log(message: str, command: str = "score") -> None:
    print(f"mmray {command}: {message}", file=sys.stderr, flush=True)


class ScoringProgress:
    """``scored 1,200/3,000 rows (40%)  450 rows/s  ETA 0:04``, from the row counts in the footers of
    the part files already written to staging (files still being written are skipped until done)."""

    def __init__(self, stage: commit.Staging, total: int, command: str = "score"):
        self.stage, self.total, self.command = stage, total, command
        self.started = time.monotonic()
        self.rows: dict[str, int] = {}  # finished part file -> rows
        self.shown = -1

    def poll(self) -> None:
        infos = self.stage.fs.get_file_info(pafs.FileSelector(self.stage.raw, allow_not_found=True, recursive=True))
        for info in infos:
            if info.type == pafs.FileType.File and info.path.endswith(".parquet") and info.path not in self.rows:
                with contextlib.suppress(OSError, pa.ArrowException):  # not complete yet: counted next time
                    self.rows[info.path] = pq.read_metadata(info.path, filesystem=self.stage.fs).num_rows
        done = sum(self.rows.values())
        if done == self.shown or not done:
            return
        self.shown = done
        elapsed = time.monotonic() - self.started
        rate = done / max(elapsed, 1e-9)
        eta = f"  ETA {format_duration((self.total - done) / rate)}" if 0 < done < self.total else ""
        line = (
            f"mmray {self.command}: {'scored' if self.command == 'score' else 'done'} {done:,}/{self.total:,} rows ({done / max(self.total, 1):.0%})  "
            f"{format_count(rate)} rows/s{eta}"
        )
        if sys.stderr.isatty():
            line = f"{line}  {bar(done / max(self.total, 1))}"
            print(f"\r{line}\033[K", end="\n" if done >= self.total else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def _gpus_per_actor(requested: float, command: str) -> float:
    """``score.num_gpus`` when the cluster has GPUs; CPU scoring (with a warning) when it has none."""
    if requested > 0 and not ray.cluster_resources().get("GPU", 0):
        _log(f"score.num_gpus={requested} but the Ray cluster has no GPU; running on CPU", command)
        return 0.0
    return requested


def _demands(cfg: Config, num_gpus: float) -> list[Demand]:
    """The preprocessing pool, the predictor pool and Ray Data's tasks all run at once while scoring."""
    sc = cfg.score
    predictor = {"CPU": sc.num_cpus, "GPU": num_gpus}
    return [
        pipeline.preprocess_demand(cfg.data.preprocess),
        Demand("score.concurrency x (score.num_cpus, score.num_gpus)", sc.concurrency, predictor),
        READ_TASKS,
    ]


def _only_ids(ds: ray.data.Dataset, column: str, ids: list[str]) -> ray.data.Dataset:
    """The rows whose id (as a string, as the quarantine records it) is one of ``ids``."""
    wanted = pa.array(ids, pa.string())

    def keep(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.is_in(pc.cast(batch[column], pa.string()), value_set=wanted))

    return ds.map_batches(keep, batch_format="pyarrow")


def _scored_stream(
    cfg: Config,
    input_uri: str,
    files: list[str],
    columns: list[str],
    spec: PreprocessSpec,
    tokenizer_files: dict[str, bytes],
    checkpoint: str,
    mid: str,
    label_tasks: tuple[Task, ...],
    num_gpus: float,
    output: str,
    only: list[str] | None = None,
) -> ray.data.Dataset:
    sc = cfg.score
    source = guard_stalls(pipeline.read_input(input_uri, files, cfg.storage, columns), cfg.data.stall_timeout_s)
    if only is not None:
        source = _only_ids(source, spec.id_column, only)
    preprocessed = pipeline.preprocess(
        source, spec, tokenizer_files, cfg.data.preprocess, actor=LabeledPreprocessor, extra_args=(label_tasks,)
    )
    args = (checkpoint, cfg.storage, mid, "cuda" if num_gpus else "cpu", bool(label_tasks), output)
    return pipeline.map_with_actors(preprocessed, Predictor, args, sc.batch_size, sc.concurrency, sc.num_cpus, num_gpus)


def _manifest(
    run_id: str,
    scored_at: dt.datetime,
    checkpoint: str,
    mid: str,
    tasks: tuple[Task, ...],
    identity: dict,
    result: Finalized,
    counts: dict[str, int],
    evaluate: bool,
    output: RowOutput,
) -> dict[str, Any]:
    return {
        "format_version": MANIFEST_FORMAT,
        "run_id": run_id,
        "output": output.command,  # "score": predictions, "embed": vectors (predictor.OUTPUTS)
        "scored_at": scored_at.isoformat(),
        "checkpoint": checkpoint,
        "model_id": mid,
        "tasks": [t.to_dict() for t in tasks],  # class order of the probabilities columns
        "partition": identity["partition"],
        "identity": identity,
        "files": result.files,
        "quarantine": {"name": commit.QUARANTINE_FILE, "rows": counts["rows_quarantined"]},
        "metrics": commit.METRICS if evaluate else None,
        **counts,
    }


def _same_identity(target: commit.Target, existing: dict, identity: dict) -> None:
    if existing["identity"]["digest"] != identity["digest"]:
        raise commit.OutputExistsError(
            f"{target.uri} already holds a committed result (run {existing['run_id']}) that differs: "
            f"{'; '.join(commit.identity_differences(existing['identity'], identity))}. Pass --overwrite to replace it."
        )


def _already_scored(target: commit.Target, identity: dict, command: str) -> dict[str, Any] | None:
    """The no-op result when ``target`` holds a commit of this identity; None when nothing is committed.

    Raises:
        OutputExistsError: a commit of a different identity is there (only --overwrite replaces it).
    """
    existing = commit.committed_run(target)
    if existing is None:
        return None
    _same_identity(target, existing, identity)
    _log(
        f"already scored: {target.uri} (run {existing['run_id']}, {existing['rows_scored']} rows); nothing to do",
        command,
    )
    counts = {k: existing[k] for k in ("rows_in", "rows_scored", "rows_quarantined")}
    return {"output": target.uri, "status": "already scored", "run_id": existing["run_id"], **counts}


def _warn_repeated(repeated: dict[str, int], command: str) -> None:
    """One line: how many ids are on more than one input row, with the most repeated few."""
    top = sorted(repeated.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    examples = ", ".join(f"{repr(i)[:60]} x{n}" for i, n in top)  # repr: no control character reaches a terminal
    _log(
        f"warning: {len(repeated):,} ids are on more than one input row ({sum(repeated.values()):,} rows; "
        f"e.g. {examples}); every row was scored: a reader that joins on id sees each of them",
        command,
    )


def _merge_retry(stage: commit.Staging, retry: _Retry, result: Finalized) -> Finalized:
    """The retried rows' files after the committed ones (carried into staging), and one quarantine:
    what was not retryable, then what failed again."""
    carried = commit.carry_committed(stage, retry.manifest)
    quarantine = pa.concat_tables([retry.kept.cast(result.quarantine.schema), result.quarantine])
    pq.write_table(quarantine, stage.file(commit.QUARANTINE_FILE), filesystem=stage.fs)
    return dataclasses.replace(result, files=carried + result.files, quarantine=quarantine)


def _retry_plan(target: commit.Target, identity: dict) -> _Retry:
    """Splits the committed quarantine into rows to score again and rows that stay (under the lease).

    Raises:
        FileNotFoundError: nothing is committed at ``target``.
        OutputExistsError: what is committed has another identity (input, model or settings).
    """
    existing = commit.committed_run(target)
    if existing is None:
        raise FileNotFoundError(f"--retry-quarantined: nothing is committed at {target.uri}; score it first")
    _same_identity(target, existing, identity)
    fs, path = target.resolve()
    quarantine = pq.read_table(f"{path}/{existing['quarantine']['name']}", filesystem=fs)
    error = pc.fill_null(quarantine["error"], "")
    retry = pc.and_(pc.equal(pc.fill_null(quarantine["stage"], ""), "preprocess"), pc.is_valid(quarantine["id"]))
    retry = pc.and_(retry, pc.starts_with(error, RETRYABLE_PREFIX))
    # The rows are found again by id: an id on any other row (scored, or quarantined again) would bring
    # that row too, and score it twice. Such rows stay quarantined.
    scored = [pq.read_table(f"{path}/{f['name']}", filesystem=fs, columns=["id"])["id"] for f in existing["files"]]
    every_id = [*(pc.cast(c, pa.string()) for c in scored), quarantine["id"].cast(pa.string())]
    unique = pc.invert(pc.is_in(quarantine["id"], value_set=pa.array(list(repeated_ids(every_id)), pa.string())))
    chosen = pc.and_(retry, pc.fill_null(unique, False))
    ids = sorted(quarantine.filter(chosen)["id"].to_pylist())
    shared = quarantine.filter(retry).num_rows - len(ids)
    return _Retry(existing, ids, quarantine.filter(pc.invert(chosen)), shared)


def run_scoring(
    cfg: Config,
    checkpoint: str,
    input_uri: str,
    output_uri: str,
    partition: dict[str, str] | None = None,
    overwrite: bool = False,
    evaluate: bool = False,
    address: str | None = None,
    retry_quarantined: bool = False,
    output: str = "predictions",
) -> dict[str, Any]:
    """Scores ``input_uri`` with ``checkpoint`` into ``output_uri`` (optionally a ``key=value`` partition).

    ``mmray score`` writes predictions, ``mmray embed`` (``output="embeddings"``) the representation,
    through this one path: what differs is the predictor's ``RowOutput`` (``predictor.row_output``).

    Args:
        overwrite: replace a committed result (atomically on local disk).
        evaluate: the input has the checkpoint's label columns; also write ``_metrics.json``.
        retry_quarantined: score again the committed quarantine's rows that failed transiently and
            commit them with the rest (needs a commit of the same input, model and settings).
        address: Ray address, used only when there is work to do (None: ``mmray.runtime.init_ray``).
        output: what each row gets: ``"predictions"`` or ``"embeddings"`` (``predictor.OUTPUTS``).

    Returns:
        ``{"output", "status", "run_id", "model_id", "rows_in", "rows_scored", "rows_quarantined", ...}``;
        status is ``"committed"`` or ``"already scored"`` (an identical commit exists; nothing was done).

    Raises:
        OutputExistsError: the target holds a commit of a different input/model/settings.
        DataQualityError: too many rows were quarantined (the quarantine is written, nothing committed).
    """
    target = commit.Target(output_uri, dict(partition or {}), cfg.storage)  # validates before any I/O
    commit.check_location(target)  # what publishing could never replace fails now, not after the scoring
    commit.check_apart(target, input_uri)
    if retry_quarantined and (overwrite or evaluate):
        raise ValueError(
            "--retry-quarantined merges into the committed result: it does not combine with "
            f"{'--overwrite' if overwrite else '--evaluate (metrics cover one run; use --overwrite)'}"
        )
    with doing("reading the checkpoint", checkpoint), open_checkpoint(checkpoint, cfg.storage) as opened:
        opened.check_weights()  # here, in one line, not in every predictor actor after the preprocessing
        info, mid, tokenizer_files = opened.info, opened.model_id(), opened.tokenizer_files()
    rows_out = row_output(output, info.tasks, evaluate, aligned=info.model.align.weight > 0)
    command = rows_out.command
    spec = info.preprocess_spec(with_labels=False, storage=cfg.storage, image_uri_roots=cfg.data.image_uri_roots)
    columns = spec.input_columns()
    label_tasks = info.tasks if evaluate else ()
    columns.update({t.name: "label" for t in label_tasks})
    files = pipeline.input_files(input_uri, columns, cfg.storage)
    in_fs, _ = storage.resolve(input_uri, cfg.storage)
    inputs = commit.fingerprint_inputs(files, in_fs, cfg.storage)
    settings = {"rows_per_file": cfg.score.rows_per_file, "evaluate": evaluate}
    if output != "predictions":  # so a commit of the other output is never "already scored"; predictions'
        settings["output"] = output  # identity stays what it was before embed existed (no rescore on upgrade)
    identity = commit.run_identity(inputs, mid, settings, target.partition)

    if not overwrite and not retry_quarantined and (done := _already_scored(target, identity, command)) is not None:
        with contextlib.suppress(commit.LeaseHeldError), commit.lease(target):
            commit.clean_stale_staging(target)  # e.g. a killed --overwrite run's; only when nobody works here
        return {**done, "model_id": mid}
    commit.check_replaceable(target)
    with commit.lease(target) as held:
        commit.clean_stale_staging(target)  # first: may restore a target a killed two-rename swap left missing
        retry = _retry_plan(target, identity) if retry_quarantined else None
        if retry is not None and retry.shared:
            _log(
                f"warning: {retry.shared:,} quarantined rows are not retried: their id is on another input row "
                "too, and rows are retried by id",
                command,
            )
        if retry is not None and not retry.ids:
            _log(
                f"nothing to retry: no row of run {retry.manifest['run_id']} was quarantined for a transient error",
                command,
            )
            counts = {k: retry.manifest[k] for k in ("rows_in", "rows_scored", "rows_quarantined")}
            return {
                "output": target.uri,
                "status": "nothing to retry",
                "run_id": retry.manifest["run_id"],
                "model_id": mid,
                **counts,
            }
        if retry is None and not overwrite and (done := _already_scored(target, identity, command)) is not None:
            return {**done, "model_id": mid}  # the run that held the lease before us committed the same
        commit.check_replaceable(target)
        seen_run = (commit.committed_run(target) or {}).get("run_id")  # re-checked before publishing
        rows_in = len(retry.ids) if retry else pipeline.count_rows(input_uri, files, cfg.storage)
        run_id = uuid.uuid4().hex[:12]
        scored_at = dt.datetime.now(dt.timezone.utc)
        stage = commit.open_staging(target, run_id)
        try:
            if rows_in:
                init_ray(address)
                num_gpus = _gpus_per_actor(cfg.score.num_gpus, command)
                check_resources(f"mmray {command}", _demands(cfg, num_gpus))
                stream = _scored_stream(
                    cfg,
                    input_uri,
                    files,
                    list(columns),
                    spec,
                    tokenizer_files,
                    checkpoint,
                    mid,
                    label_tasks,
                    num_gpus,
                    output,
                    retry.ids if retry else None,
                )
                with (
                    Ticker(ScoringProgress(stage, rows_in, command).poll, progress_interval()),
                    failing_on_stall(f"mmray {command}", cfg.data.stall_timeout_s),
                ):
                    stream.write_parquet(stage.raw, filesystem=stage.fs, min_rows_per_file=cfg.score.rows_per_file)
            evaluation = LabelMetrics(info.tasks, info.model.loss_weights) if evaluate else None
            first = len(retry.manifest["files"]) if retry else 0
            result = finalize(stage, rows_out.schema(), mid, scored_at, cfg.score.rows_per_file, evaluation, first)
            if result.repeated and retry is None:
                _warn_repeated(result.repeated, command)
            counts = {
                "rows_in": rows_in,
                "rows_scored": result.rows_scored,
                "rows_quarantined": result.quarantine.num_rows,
            }
            if result.rows_raw != rows_in or counts["rows_scored"] + counts["rows_quarantined"] != rows_in:
                raise RuntimeError(f"scoring row counts do not reconcile ({result.rows_raw} rows written): {counts}")
            if retry is not None:
                result = _merge_retry(stage, retry, result)
                counts = {
                    "rows_in": retry.manifest["rows_in"],
                    "rows_scored": result.rows_scored,
                    "rows_quarantined": result.quarantine.num_rows,
                }
                if counts["rows_scored"] + counts["rows_quarantined"] != counts["rows_in"]:
                    raise RuntimeError(
                        f"retried row counts do not reconcile with run {retry.manifest['run_id']}: {counts}"
                    )
                rows_in = counts["rows_in"]
            if commit.fingerprint_inputs(files, in_fs, cfg.storage) != identity["inputs"]:
                raise RuntimeError(f"input {input_uri} changed while it was being scored; nothing committed, rerun")
            bad, limit = counts["rows_quarantined"], cfg.data.max_bad_fraction
            if rows_in and bad / rows_in > limit:
                where = commit.write_rejected_quarantine(target, result.quarantine, run_id)
                pipeline.check_bad_fraction(rows_in, bad, limit, f"{where}; nothing was committed", result.quarantine)
            if result.metrics is not None:
                stage.write_json(commit.METRICS, result.metrics)
            manifest = _manifest(
                run_id, scored_at, checkpoint, mid, info.tasks, identity, result, counts, evaluate, rows_out
            )
            held.check()
            commit.check_nesting(target)  # a commit inside or around this one may have landed meanwhile
            if (now := (commit.committed_run(target) or {}).get("run_id")) != seen_run:
                raise commit.ConcurrentCommitError(
                    f"{target.uri} changed while this run was scoring (committed run {seen_run} -> {now}); "
                    "nothing was committed: rerun (with --overwrite to replace it)"
                )
            committed_at = dt.datetime.now(dt.timezone.utc).isoformat()
            commit.publish(stage, manifest, {"run_id": run_id, "committed_at": committed_at, **counts}, held)
        except BaseException:
            stage.discard()
            raise
        took = (dt.datetime.now(dt.timezone.utc) - scored_at).total_seconds()
        _log(
            f"committed {counts['rows_scored']:,} rows in {len(result.files)} files to {target.uri} "
            f"({counts['rows_quarantined']:,} quarantined) in {format_duration(took)}, "
            f"{format_count(rows_in / max(took, 1e-9))} rows/s",
            command,
        )
        out = {
            "output": target.uri,
            "status": "committed",
            "run_id": run_id,
            "model_id": mid,
            "scored_at": scored_at.isoformat(),
            "files": len(result.files),
            "quarantine": target.child_uri(commit.QUARANTINE_FILE),
            **counts,
        }
        if retry is not None:
            out.update(retried=len(retry.ids), retried_from=retry.manifest["run_id"])
        if result.metrics is not None:
            out["metrics"] = result.metrics
        return out
