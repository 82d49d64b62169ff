"""Batch scoring: Parquet in -> the scoring pools (``score.pools``) -> hidden staging -> committed output.

The same job writes predictions (``mmray score``) or the multimodal representation (``mmray embed``):
only the predictor's ``RowOutput`` and so the output schema differ; the steps below are the same.

1. The checkpoint is fetched once on the driver for its label maps, tokenizer and ``model_id`` (content
   hash); the input is listed, schema-checked and fingerprinted (paths, sizes, content: S3 ETags or
   Parquet footer hashes).
2. A commit of the same (input, model, settings, partition) at the target makes the run a no-op
   ("already scored"); a commit of a different one is replaced only with ``overwrite``.
3. The run takes the target's lease (another live run holding it: ``LeaseHeldError``, nothing done)
   and decides step 2 again under it: another run may have committed meanwhile.
4. Rows stream through the scoring pools (``pools``: on CPU one pool that reads its slices of the
   input, preprocesses and predicts; with a GPU predictor, a preprocessing and a predicting pool) into
   ``<staging>/_raw``.
5. ``finalize`` cuts sized part files with lineage, the quarantine and the metrics; the counts must
   reconcile with the input's Parquet metadata: ``rows_in == rows_scored + rows_quarantined``.
6. With more bad rows than ``data.max_bad_fraction``, the quarantine is written and the run fails
   without committing; otherwise, after checking that the lease is still held and the committed run
   is still the one seen in step 3, ``commit.publish`` makes the result visible (markers last).

Every input row ends up either in the output or in ``<target>/_quarantine/``. ``run_scoring`` reads as
these steps over one ``_Run`` (what step 1 fixed) and one ``_Attempt`` (what one try under the lease
writes): ``_plan`` (1), ``_already_scored`` (2), ``_settled_under_lease`` (3), ``_score_into_stage``
(4), ``_reconcile`` (5), ``_publish`` (6).

``retry_quarantined`` re-scores only the committed quarantine's rows that failed for a reason another
attempt may fix (an image fetch that failed after its retries: network, throttling, 5xx, timeouts) and
publishes a new commit of the same partition: the previous files (kept as they are, with their
``run_id``), the newly scored rows in further files, and the quarantine of what still failed or was
never retryable. Counts add up as before; a rerun of it retries what is still transient. The rows to
retry are found by their input position (the quarantine's ``row``; the input is the same, its
fingerprint is part of the identity), so only the slices that hold them are read again and a row is
retried whatever its id, repeated or not (ids repeated in the input are reported by the scoring run
that finds them). A quarantine written before positions were recorded has none: its rows stay
quarantined, and the run says how many.
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

from mmray.checkpoint import CheckpointInfo, open_checkpoint
from mmray.config import Config
from mmray.console import Ticker, bar, doing, format_count, format_duration, progress_interval, say, verbose
from mmray.data import pipeline, storage
from mmray.data.labels import Task
from mmray.data.preprocess import PreprocessSpec
from mmray.runtime import check_resources, failing_on_stall, init_ray
from mmray.score import commit
from mmray.score.finalize import Finalized, finalize
from mmray.score.label_metrics import LabelMetrics
from mmray.score.pools import Pools, plan_pools, scored_stream
from mmray.score.predictor import RowOutput, row_output
from mmray.score.timings import StepTimes

__all__ = ["MANIFEST_FORMAT", "run_scoring"]

MANIFEST_FORMAT = 1
# Quarantine reasons another attempt may fix: preprocess's "image fetch failed: <uri>: <error>" is what an
# image read that exhausted data.preprocess.fetch_attempts leaves (not found / not allowed / too large differ).
RETRYABLE_PREFIX = "image fetch failed: "


@dataclasses.dataclass(frozen=True)
class _Retry:
    """What ``--retry-quarantined`` works from: the committed run and its quarantine, split."""

    manifest: dict
    rows: list[int]  # input positions of the quarantined rows to score again, sorted
    kept: pa.Table  # quarantine rows that stay (not retryable, or without a recorded position)


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
        say(f"score.num_gpus={requested} but the Ray cluster has no GPU; running on CPU", command)
        return 0.0
    return requested


@dataclasses.dataclass(frozen=True)
class _Run:
    """What one scoring run works from, fixed before it touches the target: every later step reads this
    one object instead of a dozen loose arguments."""

    cfg: Config
    target: commit.Target
    input_uri: str
    checkpoint: str  # as given: the predictor actors open it again
    info: CheckpointInfo
    model_id: str  # the checkpoint's content hash
    tokenizer_files: dict[str, bytes]
    rows_out: RowOutput  # what each row gets: predictions or embeddings, and so the output schema
    spec: PreprocessSpec
    columns: dict[str, str]  # input column -> expected kind (the label columns too with evaluate)
    label_tasks: tuple[Task, ...]  # the checkpoint's tasks with evaluate, else none
    # The input's files as listed (in order, schema-checked once) -> each one's footer: its row groups
    # and sizes, which the slices are cut from.
    footers: dict[str, pq.FileMetaData]
    in_fs: pafs.FileSystem
    identity: dict  # commit.run_identity: input content, model, settings, partition
    row_kind: str  # what each row gets: "predictions" or "embeddings" (predictor.ROW_KINDS)
    evaluate: bool
    overwrite: bool
    retry_quarantined: bool

    @property
    def command(self) -> str:
        return self.rows_out.command


@dataclasses.dataclass(frozen=True)
class _Attempt:
    """One try at a commit, under the lease: its id, its staging directory and what it started from."""

    run_id: str
    scored_at: dt.datetime
    stage: commit.Staging
    seen_run: str | None  # the committed run when the lease was taken: re-checked before publishing
    rows_in: int  # rows this attempt scores: the whole input, or the quarantined rows it retries
    retry: _Retry | None


def _scored_stream(run: _Run, pools: Pools, rows: int, only_rows: list[int] | None = None) -> ray.data.Dataset:
    """The input (only the rows at these input positions, when given) through the scoring pools."""
    cfg = run.cfg
    source = (run.input_uri, list(run.columns), cfg.storage, run.footers)
    predictor = (run.checkpoint, cfg.storage, run.model_id, bool(run.label_tasks), run.row_kind)
    preprocessor = (run.tokenizer_files, run.label_tasks)
    return scored_stream(cfg, pools, source, run.spec, preprocessor, predictor, rows, only_rows)


def _manifest(run: _Run, attempt: _Attempt, result: Finalized, counts: dict[str, int]) -> dict[str, Any]:
    """What ``_SUCCESS`` describes: enough for a reader (and a later retry) without the scoring run."""
    return {
        "format_version": MANIFEST_FORMAT,
        "run_id": attempt.run_id,
        "output": run.command,  # what wrote the rows, "score" or "embed" (a persisted key: readers parse it)
        "scored_at": attempt.scored_at.isoformat(),
        "checkpoint": run.checkpoint,
        "model_id": run.model_id,
        "tasks": [t.to_dict() for t in run.info.tasks],  # class order of the probabilities columns
        "partition": run.identity["partition"],
        "identity": run.identity,
        "files": result.files,
        "quarantine": {"name": commit.QUARANTINE_FILE, "rows": counts["rows_quarantined"]},
        "metrics": commit.METRICS if run.evaluate else None,
        **counts,
    }


def _same_identity(target: commit.Target, existing: dict, identity: dict) -> None:
    if existing["identity"]["digest"] != identity["digest"]:
        raise commit.OutputExistsError(
            f"{target.uri} already holds a committed result (run {existing['run_id']}) that differs: "
            f"{'; '.join(commit.identity_differences(existing['identity'], identity))}. Pass --overwrite to replace it."
        )


def _warn_repeated(repeated: dict[str, int], command: str) -> None:
    """One line: how many ids are on more than one input row, with the most repeated few."""
    top = sorted(repeated.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    examples = ", ".join(f"{repr(i)[:60]} x{n}" for i, n in top)  # repr: no control character reaches a terminal
    say(
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


def _retry_plan(run: _Run) -> _Retry:
    """Splits the committed quarantine into rows to score again (by input position) and rows that stay
    (under the lease), and says how many retryable rows stay because no position was recorded.

    Raises:
        FileNotFoundError: nothing is committed at ``target``.
        OutputExistsError: what is committed has another identity (input, model or settings).
    """
    target = run.target
    existing = commit.committed_run(target)
    if existing is None:
        raise FileNotFoundError(f"--retry-quarantined: nothing is committed at {target.uri}; score it first")
    _same_identity(target, existing, run.identity)
    fs, path = target.resolve()
    quarantine = pq.read_table(f"{path}/{existing['quarantine']['name']}", filesystem=fs)
    if "row" not in quarantine.column_names:  # written before positions were recorded
        quarantine = quarantine.append_column("row", pa.nulls(quarantine.num_rows, pa.int64()))
    error = pc.fill_null(quarantine["error"], "")
    retry = pc.and_(
        pc.equal(pc.fill_null(quarantine["stage"], ""), "preprocess"), pc.starts_with(error, RETRYABLE_PREFIX)
    )
    chosen = pc.and_(retry, pc.is_valid(quarantine["row"]))
    rows = sorted(quarantine.filter(chosen)["row"].to_pylist())
    if unplaced := quarantine.filter(retry).num_rows - len(rows):
        say(
            f"warning: {unplaced:,} quarantined rows are not retried: run {existing['run_id']}'s quarantine "
            "does not record their input position (an older mmray wrote it); --overwrite scores the input again",
            run.command,
        )
    return _Retry(existing, rows, quarantine.filter(pc.invert(chosen)))


def _counts(rows_in: int, result: Finalized) -> dict[str, int]:
    return {"rows_in": rows_in, "rows_scored": result.rows_scored, "rows_quarantined": result.quarantine.num_rows}


def _plan(
    cfg: Config,
    checkpoint: str,
    input_uri: str,
    target: commit.Target,
    overwrite: bool,
    evaluate: bool,
    retry_quarantined: bool,
    row_kind: str,
) -> _Run:
    """Step 1: reads the checkpoint and lists, checks and fingerprints the input, so that a bad model, a
    bad input or a wrong flag fails here, before any lease is taken or Ray is started."""
    if retry_quarantined and (overwrite or evaluate):
        raise ValueError(
            "--retry-quarantined merges into the committed result: it does not combine with "
            f"{'--overwrite' if overwrite else '--evaluate (metrics cover one run; use --overwrite)'}"
        )
    with doing("reading the checkpoint", checkpoint), open_checkpoint(checkpoint, cfg.storage) as opened:
        opened.check_weights()  # here, in one line, not in every predictor actor after the preprocessing
        info, mid, tokenizer_files = opened.info, opened.model_id(), opened.tokenizer_files()
    rows_out = row_output(row_kind, info.tasks, evaluate, aligned=info.model.align.weight > 0)
    spec = info.preprocess_spec(with_labels=False, storage=cfg.storage, image_uri_roots=cfg.data.image_uri_roots)
    columns = spec.input_columns()
    label_tasks = info.tasks if evaluate else ()
    columns.update({t.name: "label" for t in label_tasks})
    footers = pipeline.input_footers(input_uri, columns, cfg.storage)
    in_fs, _ = storage.resolve(input_uri, cfg.storage)
    inputs = commit.fingerprint_inputs(list(footers), in_fs, cfg.storage)
    settings = {"rows_per_file": cfg.score.rows_per_file, "evaluate": evaluate}
    # Embeddings' identity names the kind, so a commit of the other kind is never "already scored";
    # predictions' stays what it was before embed existed (no rescore on upgrade). The key stays "output":
    # committed identities hold it.
    if row_kind != "predictions":
        settings["output"] = row_kind
    identity = commit.run_identity(inputs, mid, settings, target.partition)
    return _Run(
        cfg=cfg,
        target=target,
        input_uri=input_uri,
        checkpoint=checkpoint,
        info=info,
        model_id=mid,
        tokenizer_files=tokenizer_files,
        rows_out=rows_out,
        spec=spec,
        columns=columns,
        label_tasks=label_tasks,
        footers=footers,
        in_fs=in_fs,
        identity=identity,
        row_kind=row_kind,
        evaluate=evaluate,
        overwrite=overwrite,
        retry_quarantined=retry_quarantined,
    )


def _already_scored(run: _Run) -> dict[str, Any] | None:
    """The no-op result when the target holds a commit of this identity; None when nothing is committed.

    Raises:
        OutputExistsError: a commit of a different identity is there (only --overwrite replaces it).
    """
    existing = commit.committed_run(run.target)
    if existing is None:
        return None
    _same_identity(run.target, existing, run.identity)
    say(
        f"already scored: {run.target.uri} (run {existing['run_id']}, {existing['rows_scored']} rows); nothing to do",
        run.command,
    )
    counts = {k: existing[k] for k in ("rows_in", "rows_scored", "rows_quarantined")}
    return {"output": run.target.uri, "status": "already scored", "run_id": existing["run_id"], **counts}


def _settled_under_lease(run: _Run, retry: _Retry | None) -> dict[str, Any] | None:
    """Step 3, step 2 again now that no other run can commit: the result when nothing is left to do (no
    transient failure to retry; or the run that held the lease before this one committed the same)."""
    if retry is not None and not retry.rows:
        say(
            f"nothing to retry: no row of run {retry.manifest['run_id']} was quarantined for a transient error",
            run.command,
        )
        counts = {k: retry.manifest[k] for k in ("rows_in", "rows_scored", "rows_quarantined")}
        return {
            "output": run.target.uri,
            "status": "nothing to retry",
            "run_id": retry.manifest["run_id"],
            "model_id": run.model_id,
            **counts,
        }
    if retry is None and not run.overwrite and (done := _already_scored(run)) is not None:
        return {**done, "model_id": run.model_id}
    return None


def _begin(run: _Run, retry: _Retry | None) -> _Attempt:
    """Opens this attempt's staging under the lease, noting the committed run it will replace."""
    commit.check_replaceable(run.target)
    seen_run = (commit.committed_run(run.target) or {}).get("run_id")  # re-checked before publishing
    rows_in = len(retry.rows) if retry else sum(meta.num_rows for meta in run.footers.values())
    run_id = uuid.uuid4().hex[:12]
    scored_at = dt.datetime.now(dt.timezone.utc)
    return _Attempt(run_id, scored_at, commit.open_staging(run.target, run_id), seen_run, rows_in, retry)


def _score_into_stage(run: _Run, attempt: _Attempt, address: str | None, times: StepTimes) -> None:
    """Step 4: rows stream through the actor pools into ``<staging>/_raw``; Ray starts only here, when
    there is work to do, and the resource check fails a job that could never finish before it starts."""
    with times.step("ray"):
        init_ray(address)
        pools = plan_pools(run.cfg, attempt.rows_in, _gpus_per_actor(run.cfg.score.num_gpus, run.command))
        check_resources(f"mmray {run.command}", pools.demands(run.cfg))
    if verbose():
        say(f"{attempt.rows_in:,} rows: {pools.describe()}", run.command)
    stream = _scored_stream(run, pools, attempt.rows_in, attempt.retry.rows if attempt.retry else None)
    with (
        times.stream(pools.readers + pools.predictors, detail=verbose()),
        Ticker(ScoringProgress(attempt.stage, attempt.rows_in, run.command).poll, progress_interval()),
        failing_on_stall(f"mmray {run.command}", run.cfg.data.stall_timeout_s),
    ):
        stream.write_parquet(
            attempt.stage.raw, filesystem=attempt.stage.fs, min_rows_per_file=run.cfg.score.rows_per_file
        )


def _reconcile(run: _Run, attempt: _Attempt) -> tuple[Finalized, dict[str, int]]:
    """Step 5: cuts the staged rows into part files and proves that none was lost or added
    (``rows_in == rows_scored + rows_quarantined``, a retry's against the run it extends) and that the
    input did not change meanwhile: a result that does not add up is never committed."""
    retry, rows_in = attempt.retry, attempt.rows_in
    evaluation = LabelMetrics(run.info.tasks, run.info.model.loss_weights) if run.evaluate else None
    first = len(retry.manifest["files"]) if retry else 0
    rows_per_file = run.cfg.score.rows_per_file
    result = finalize(
        attempt.stage, run.rows_out.schema(), run.model_id, attempt.scored_at, rows_per_file, evaluation, first
    )
    if result.repeated and retry is None:
        _warn_repeated(result.repeated, run.command)
    counts = _counts(rows_in, result)
    if result.rows_raw != rows_in or counts["rows_scored"] + counts["rows_quarantined"] != rows_in:
        raise RuntimeError(f"scoring row counts do not reconcile ({result.rows_raw} rows written): {counts}")
    if retry is not None:
        result = _merge_retry(attempt.stage, retry, result)
        counts = _counts(retry.manifest["rows_in"], result)
        if counts["rows_scored"] + counts["rows_quarantined"] != counts["rows_in"]:
            raise RuntimeError(f"retried row counts do not reconcile with run {retry.manifest['run_id']}: {counts}")
    if commit.fingerprint_inputs(list(run.footers), run.in_fs, run.cfg.storage) != run.identity["inputs"]:
        raise RuntimeError(f"input {run.input_uri} changed while it was being scored; nothing committed, rerun")
    return result, counts


def _check_bad_fraction(run: _Run, attempt: _Attempt, result: Finalized, counts: dict[str, int]) -> None:
    """Step 6's gate: with more bad rows than ``data.max_bad_fraction`` the quarantine is kept where a
    person can read it and the run fails (``DataQualityError``) without committing."""
    rows_in, bad, limit = counts["rows_in"], counts["rows_quarantined"], run.cfg.data.max_bad_fraction
    if rows_in and bad / rows_in > limit:
        where = commit.write_rejected_quarantine(run.target, result.quarantine, attempt.run_id)
        pipeline.check_bad_fraction(rows_in, bad, limit, f"{where}; nothing was committed", result.quarantine)


def _publish(run: _Run, attempt: _Attempt, result: Finalized, counts: dict[str, int], held: commit.Lease) -> None:
    """Step 6: makes the staged result the committed one (markers last), only while the lease is still
    held and the committed run is still the one seen when the attempt began."""
    _check_bad_fraction(run, attempt, result, counts)
    if result.metrics is not None:
        attempt.stage.write_json(commit.METRICS, result.metrics)
    manifest = _manifest(run, attempt, result, counts)
    held.check()
    commit.check_nesting(run.target)  # a commit inside or around this one may have landed meanwhile
    if (now := (commit.committed_run(run.target) or {}).get("run_id")) != attempt.seen_run:
        raise commit.ConcurrentCommitError(
            f"{run.target.uri} changed while this run was scoring (committed run {attempt.seen_run} -> {now}); "
            "nothing was committed: rerun (with --overwrite to replace it)"
        )
    committed_at = dt.datetime.now(dt.timezone.utc).isoformat()
    commit.publish(attempt.stage, manifest, {"run_id": attempt.run_id, "committed_at": committed_at, **counts}, held)


def _committed(
    run: _Run, attempt: _Attempt, result: Finalized, counts: dict[str, int], times: StepTimes
) -> dict[str, Any]:
    """The one summary line (with ``--verbose``, a second: where the seconds went) and the command's
    result of a committed run."""
    took = (dt.datetime.now(dt.timezone.utc) - attempt.scored_at).total_seconds()
    say(
        f"committed {counts['rows_scored']:,} rows in {len(result.files)} files to {run.target.uri} "
        f"({counts['rows_quarantined']:,} quarantined) in {format_duration(took)}, "
        f"{format_count(counts['rows_in'] / max(took, 1e-9))} rows/s",
        run.command,
    )
    if verbose():
        say(times.line(), run.command)
    out = {
        "output": run.target.uri,
        "status": "committed",
        "run_id": attempt.run_id,
        "model_id": run.model_id,
        "scored_at": attempt.scored_at.isoformat(),
        "files": len(result.files),
        "quarantine": run.target.child_uri(commit.QUARANTINE_FILE),
        **counts,
    }
    if attempt.retry is not None:
        out.update(retried=len(attempt.retry.rows), retried_from=attempt.retry.manifest["run_id"])
    if result.metrics is not None:
        out["metrics"] = result.metrics
    return out


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
    row_kind: str = "predictions",
) -> dict[str, Any]:
    """Scores ``input_uri`` with ``checkpoint`` into ``output_uri`` (optionally a ``key=value`` partition).

    ``mmray score`` writes predictions, ``mmray embed`` (``row_kind="embeddings"``) the representation,
    through this one path: what differs is the predictor's ``RowOutput`` (``predictor.row_output``).
    It reads as the module docstring's steps: plan -> score into the stage -> reconcile -> publish.

    Args:
        overwrite: replace a committed result (atomically on local disk).
        evaluate: the input has the checkpoint's label columns; also write ``_metrics.json``.
        retry_quarantined: score again the committed quarantine's rows that failed transiently and
            commit them with the rest (needs a commit of the same input, model and settings).
        address: Ray address, used only when there is work to do (None: ``mmray.runtime.init_ray``).
        row_kind: what each row gets: ``"predictions"`` or ``"embeddings"`` (``predictor.ROW_KINDS``).

    Returns:
        ``{"output", "status", "run_id", "model_id", "rows_in", "rows_scored", "rows_quarantined", ...}``;
        status is ``"committed"`` or ``"already scored"`` (an identical commit exists; nothing was done).

    Raises:
        OutputExistsError: the target holds a commit of a different input/model/settings.
        DataQualityError: too many rows were quarantined (the quarantine is written, nothing committed).
    """
    times = StepTimes()
    target = commit.Target(output_uri, dict(partition or {}), cfg.storage)  # validates before any I/O
    with times.step("plan"):
        commit.check_location(target)  # what publishing could never replace fails now, not after the scoring
        commit.check_apart(target, input_uri)
        run = _plan(cfg, checkpoint, input_uri, target, overwrite, evaluate, retry_quarantined, row_kind)
    if not run.overwrite and not run.retry_quarantined and (done := _already_scored(run)) is not None:
        with contextlib.suppress(commit.LeaseHeldError), commit.lease(target):
            commit.clean_stale_staging(target)  # e.g. a killed --overwrite run's; only when nobody works here
        return {**done, "model_id": run.model_id}
    commit.check_replaceable(target)
    with commit.lease(target) as held:
        with times.step("lease"):
            commit.clean_stale_staging(target)  # first: may restore a target a killed two-rename swap left missing
            retry = _retry_plan(run) if run.retry_quarantined else None
            if (done := _settled_under_lease(run, retry)) is not None:
                return done
            attempt = _begin(run, retry)
        try:
            if attempt.rows_in:
                _score_into_stage(run, attempt, address, times)
            with times.step("finalize"):
                result, counts = _reconcile(run, attempt)
            with times.step("publish"):
                _publish(run, attempt, result, counts, held)
        except BaseException:
            attempt.stage.discard()
            raise
        return _committed(run, attempt, result, counts, times)
