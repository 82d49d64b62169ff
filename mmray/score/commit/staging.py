"""A run's hidden staging directory, the owner record that keeps it safe, and the cleanup of killed runs.

Staging is where a run writes everything before anything becomes visible. A run may be killed at any
point, so a later run must tell a dead run's staging (removed) from a live one's (left alone): each
staging directory names its owner process, and only records of live processes protect it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass

import pyarrow.fs as pafs

from mmray.score import lease as leases
from mmray.score.commit import atomic, markers
from mmray.score.commit.target import OLD, OWNER, RAW, STAGING, Target, companion, companion_home

__all__ = ["Staging", "carry_committed", "clean_stale_staging", "open_staging", "staging_dirs"]


@dataclass(frozen=True)
class Staging:
    """One run's hidden staging directory."""

    target: Target
    run_id: str
    fs: pafs.FileSystem
    path: str  # the staging directory (filesystem path)
    final: str  # the target directory (filesystem path)

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def raw(self) -> str:
        return f"{self.path}/{RAW}"

    def file(self, name: str) -> str:
        return f"{self.path}/{name}"

    def write_json(self, name: str, obj: dict) -> None:
        markers.write_json(self.fs, self.file(name), obj)

    def discard(self) -> None:
        """Best effort: removes this run's staging (a killed run's is removed by a later run)."""
        with contextlib.suppress(OSError):
            self.fs.delete_dir(self.path)


def carry_committed(st: Staging, manifest: dict) -> list[dict]:
    """Copies the data files of the commit ``manifest`` describes into ``st``'s staging, under their names
    (a hard link where the filesystem allows), for a new commit that keeps them; returns their manifest
    entries, each with the ``run_id`` that wrote it. Call it under the lease: the files are then the
    committed ones."""
    carried = []
    for f in manifest["files"]:
        src, dst = f"{st.final}/{f['name']}", st.file(f["name"])
        if st.local:
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        else:
            st.fs.copy_file(src, dst)
        carried.append({**f, "run_id": f.get("run_id") or manifest["run_id"]})
    return carried


def _read_record(fs: pafs.FileSystem, path: str) -> dict | None:
    """An owner record; None when missing or unreadable (a record nobody can read names no live owner)."""
    try:
        return markers.read_json(fs, path)
    except (ValueError, UnicodeDecodeError):
        return None


def staging_dirs(fs: pafs.FileSystem, final: str) -> list[str]:
    """This target's staging directories (any run)."""
    parent, name = companion_home(fs, final)
    try:
        entries = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for e in entries:
        m = STAGING.match(os.path.basename(e.path))
        if m and e.type == pafs.FileType.Directory and m.group("name") == name:
            out.append(e.path)
    return out


def _old_dirs(final: str) -> list[str]:
    """Local only: previous partitions a two-rename swap moved aside (``_old-<run>-<name>``)."""
    parent, name = os.path.split(final)
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        return sorted(
            os.path.join(parent, n) for n in os.listdir(parent) if (m := OLD.match(n)) and m.group("name") == name
        )
    return []


def clean_stale_staging(target: Target) -> list[str]:
    """Removes staging directories of runs that are no longer running; returns what it removed.

    Locally it first repairs a two-rename swap that was killed between its renames: a missing target is
    restored from its ``_old-*`` directory, and any other ``_old-*`` is removed. Call it under the lease.
    """
    fs, final = target.resolve()
    removed = []
    if isinstance(fs, pafs.LocalFileSystem):
        for old in _old_dirs(final):
            if not os.path.lexists(final):
                os.rename(old, final)  # the killed swap's previous partition comes back, whole
                atomic.fsync(os.path.dirname(final))
                continue
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
    for path in staging_dirs(fs, final):
        if leases.record_alive(_read_record(fs, f"{path}/{OWNER}")):
            continue
        with contextlib.suppress(FileNotFoundError):
            fs.delete_dir(path)
        removed.append(path)
    return removed


def open_staging(target: Target, run_id: str) -> Staging:
    """Cleans stale staging, then creates this run's staging directory with its owner record."""
    if not re.fullmatch(r"[0-9a-f]{12}", run_id):
        raise ValueError(f"run_id must be 12 hex digits, got {run_id!r}")
    clean_stale_staging(target)
    fs, final = target.resolve()
    path = companion(fs, final, f"_staging-{run_id}")
    fs.create_dir(path, recursive=True)
    markers.write_json(fs, f"{path}/{OWNER}", leases.process_record())
    return Staging(target, run_id, fs, path, final)
