"""The markers (``_SUCCESS``, ``_manifest.json``) and what they decide: what is committed at a target, how
to read exactly that, and whether a target may be replaced at all.

Readers go through here rather than listing the target, so they never see a partial S3 publish and
never mix two runs' files.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mmray.data import storage
from mmray.score.commit import atomic
from mmray.score.commit.target import (
    LEASE,
    MANIFEST,
    MARKERS,
    QUARANTINE,
    QUARANTINE_FILE,
    STAGING,
    SUCCESS,
    OutputExistsError,
    Target,
)

__all__ = [
    "check_nesting",
    "check_replaceable",
    "committed_files",
    "committed_run",
    "read_committed",
    "read_json",
    "write_json",
    "write_rejected_quarantine",
]

_READ_ATTEMPTS = 5  # read_committed retries this often when publishes keep replacing what it reads


def read_json(fs: pafs.FileSystem, path: str) -> dict | None:
    """A JSON file's content; None when it does not exist."""
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except OSError as e:  # S3 reports a missing key as a generic OSError
        if "not found" in str(e).lower() or "nosuchkey" in str(e).lower().replace(" ", ""):
            return None
        raise


def write_json(fs: pafs.FileSystem, path: str, obj: dict) -> None:
    """Writes a JSON file; locally via a temporary file, fsync and rename, so no reader ever sees it
    half-written (an S3 PUT is atomic by itself)."""
    data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8")
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    atomic.replace_file(path, data)


def committed_run(target: Target) -> dict | None:
    """The manifest of the committed run at ``target``, or None when nothing is committed there.

    Committed means: ``_SUCCESS`` exists and names the same run as ``_manifest.json``.
    """
    fs, path = target.resolve()
    success = read_json(fs, f"{path}/{SUCCESS}")
    if not success:
        return None
    manifest = read_json(fs, f"{path}/{MANIFEST}")
    if not manifest or manifest.get("run_id") != success.get("run_id"):
        return None
    return manifest


def _required_run(target: Target) -> dict:
    manifest = committed_run(target)
    if manifest is None:
        raise FileNotFoundError(f"no committed scoring output at {target.uri} (no {SUCCESS})")
    return manifest


def committed_files(target: Target) -> list[str]:
    """URIs of the committed data files, from the manifest; raises when nothing is committed.

    mmray's own readers use this instead of listing, so they never see a partial S3 publish.
    """
    return [target.child_uri(f["name"]) for f in _required_run(target)["files"]]


def _success_run(fs: pafs.FileSystem, path: str) -> str | None:
    success = read_json(fs, f"{path}/{SUCCESS}")
    return success.get("run_id") if success else None


def read_committed(target: Target, columns: list[str] | None = None) -> pa.Table:
    """The committed rows (exactly the manifest's files) as one table, all from one ``_SUCCESS`` generation.

    A publish that lands while the files are read (S3 copies over the same names; a local swap) is
    detected (``_SUCCESS`` names another run afterwards, or a row's ``run_id`` is not the manifest's)
    and the read starts again, so the result is never a mix of two runs.
    """
    fs, path = target.resolve()
    for _ in range(_READ_ATTEMPTS):
        manifest = _required_run(target)
        run_id = manifest["run_id"]
        try:
            tables = [pq.read_table(f"{path}/{f['name']}", filesystem=fs, columns=columns) for f in manifest["files"]]
        except (OSError, pa.ArrowInvalid):
            if _success_run(fs, path) == run_id:
                raise  # the generation did not change: a real error
            continue
        if _success_run(fs, path) != run_id:
            continue
        if any(
            t.num_rows
            and "run_id" in t.column_names
            and not pc.all(pc.equal(t["run_id"], f.get("run_id", run_id))).as_py()
            for t, f in zip(tables, manifest["files"])
        ):
            continue
        return pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.null()) for c in columns or []})
    raise RuntimeError(
        f"{storage.redact(target.uri)} was republished while being read, {_READ_ATTEMPTS} times; read it again"
    )


def _is_commit(fs: pafs.FileSystem, directory: str) -> bool:
    found = fs.get_file_info([f"{directory}/{SUCCESS}", f"{directory}/{MANIFEST}"])
    return any(i.type == pafs.FileType.File for i in found)


def _committed_around(fs: pafs.FileSystem, final: str) -> str | None:
    """The nearest directory above ``final`` that holds a commit, or None."""
    parts = final.split("/")
    for n in range(len(parts) - 1, 0, -1):
        above = "/".join(parts[:n])
        if above and not above.endswith(":") and _is_commit(fs, above):
            return above
    return None


def _committed_inside(fs: pafs.FileSystem, final: str) -> str | None:
    """The first directory below ``final`` (breadth first, hidden entries skipped) that holds a commit."""
    queue = [final]
    while queue:
        here = queue.pop(0)
        try:
            entries = fs.get_file_info(pafs.FileSelector(here, allow_not_found=True))
        except (NotADirectoryError, FileNotFoundError):
            continue
        for e in sorted(entries, key=lambda e: e.path):
            name = os.path.basename(e.path)
            if e.type != pafs.FileType.Directory or name.startswith(("_", ".")):
                continue
            if _is_commit(fs, e.path):
                return e.path
            queue.append(e.path)
    return None


def check_nesting(target: Target) -> None:
    """Refuses a target inside, or around, a directory that holds another commit.

    Two commits one inside the other break exactly-once: a recursive reader of the outer one sees every
    row of both, an ``--overwrite`` of the outer one deletes the inner commit with the directory it
    swaps out, and the two hold different leases, so neither publish waits for the other. Checked before
    the work and again just before publishing (hidden entries, such as staging, are not commits).

    Raises:
        OutputExistsError: naming both locations.
    """
    fs, final = target.resolve()
    local = isinstance(fs, pafs.LocalFileSystem)
    if local:
        final = os.path.realpath(final)
    shown = storage.redact(target.uri)

    def uri(path: str) -> str:
        return storage.redact(path if local else f"s3://{path}")

    if (outer := _committed_around(fs, final)) is not None:
        raise OutputExistsError(
            f"{shown} is inside {uri(outer)}, which holds a committed scoring output: a reader of it would see "
            "both; choose an output outside it (or a --partition of an output that is not committed itself)"
        )
    if (inner := _committed_inside(fs, final)) is not None:
        raise OutputExistsError(
            f"{shown} holds {uri(inner)}, a committed scoring output of its own: committing around it would "
            "mix both (and --overwrite would delete it); choose another output"
        )


def check_replaceable(target: Target) -> None:
    """Refuses a target that holds data mmray did not write (publishing replaces the whole directory),
    and one inside or around another commit (``check_nesting``).

    Replaceable: absent, empty (but for this target's own lease and staging on S3), or carrying one of
    mmray's markers (``_SUCCESS``, ``_manifest.json`` or ``_quarantine``, which an S3 publish copies
    first). Hidden entries count: ``.ssh/`` or ``_archive/`` are somebody's data.
    """
    check_nesting(target)
    fs, final = target.resolve()
    info = fs.get_file_info(final)
    if info.type == pafs.FileType.NotFound:
        return
    if info.type != pafs.FileType.Directory:
        raise OutputExistsError(f"{target.uri} is a file; the output must be a directory")
    names = {os.path.basename(e.path) for e in fs.get_file_info(pafs.FileSelector(final))}
    names = {n for n in names if n != LEASE and not STAGING.match(n)}
    if names and not names & MARKERS:
        shown = sorted(names)
        raise OutputExistsError(
            f"{target.uri} holds data mmray did not write ({', '.join(shown[:3])}"
            f"{', ...' if len(shown) > 3 else ''}); refusing to replace it: choose a new or empty output"
        )


def write_rejected_quarantine(target: Target, table: pa.Table, run_id: str) -> str:
    """Writes the quarantine of a run that is NOT committed (too many bad rows); returns its URI.

    Where nothing is committed, it goes to the usual ``_quarantine/part-00000.parquet``; next to a
    committed result it goes to ``_quarantine/_rejected-<run>.parquet``, leaving the committed
    quarantine (which matches the committed data) alone.
    """
    name = QUARANTINE_FILE if committed_run(target) is None else f"{QUARANTINE}/_rejected-{run_id}.parquet"
    fs, final = target.resolve()
    fs.create_dir(f"{final}/{QUARANTINE}", recursive=True)
    tmp = f"{final}/{QUARANTINE}/.tmp-{run_id}.parquet"
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, f"{final}/{name}")  # local: atomic rename; S3: copy + delete of one small object
    return target.child_uri(name)
