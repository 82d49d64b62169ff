"""Publishing: a complete staging directory becomes the target's committed output, markers last.

Local disk renames the whole staging directory into place (markers written into it first); S3 has no
rename, so it deletes ``_SUCCESS``, copies the files to their final names and writes the markers after
them. Either way the lease is checked before anything becomes visible.
"""

from __future__ import annotations

import contextlib
import os

import pyarrow.fs as pafs

from mmray.score.commit import atomic, markers
from mmray.score.commit.staging import Staging
from mmray.score.commit.target import MANIFEST, METRICS, OWNER, QUARANTINE, QUARANTINE_FILE, SUCCESS
from mmray.score.lease import Lease

__all__ = ["publish"]


def publish(st: Staging, manifest: dict, success: dict, held: Lease) -> None:
    """Moves a complete staging directory to the target; ``_manifest.json`` then ``_SUCCESS`` land last.

    The staging directory must hold the data files named in ``manifest["files"]``, the quarantine file
    and (optionally) ``_metrics.json``; its ``_raw/`` directory is dropped.

    Args:
        held: the target's lease, checked before anything becomes visible (S3: and again before
            ``_SUCCESS``).

    Raises:
        LeaseLostError: the lease is no longer this run's; nothing was published (S3: if it was lost
            during the copy phase, ``_SUCCESS`` is not written and the target reads as uncommitted).
    """
    if manifest.get("run_id") != st.run_id or success.get("run_id") != st.run_id:
        raise ValueError("manifest and _SUCCESS must name this staging's run_id")
    if st.fs.get_file_info(st.raw).type == pafs.FileType.Directory:
        st.fs.delete_dir(st.raw)
    if st.local:
        _publish_local(st, manifest, success, held)
    else:
        _publish_copy(st, manifest, success, held)


def _publish_local(st: Staging, manifest: dict, success: dict, held: Lease) -> None:
    st.write_json(MANIFEST, manifest)
    st.write_json(SUCCESS, success)
    atomic.fsync_tree(st.path)
    held.check()
    atomic.rename_into_place(st.path, st.final, st.run_id)
    # Only now: until the rename, the record keeps other runs' cleanup away from this staging.
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(st.final, OWNER))
    atomic.fsync(st.final)


def _publish_copy(st: Staging, manifest: dict, success: dict, held: Lease) -> None:
    fs, final = st.fs, st.final
    names = [f["name"] for f in manifest["files"]]
    held.check()
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(f"{final}/{SUCCESS}")  # readers gated on _SUCCESS wait from here on
    fs.delete_dir_contents(f"{final}/{QUARANTINE}", missing_dir_ok=True)
    fs.copy_file(st.file(QUARANTINE_FILE), f"{final}/{QUARANTINE_FILE}")  # first: marks the target as ours
    for name in names:
        fs.copy_file(st.file(name), f"{final}/{name}")
    keep = set(names)
    for info in fs.get_file_info(pafs.FileSelector(final, allow_not_found=True)):
        base = os.path.basename(info.path)
        if info.type == pafs.FileType.File and not base.startswith(("_", ".")) and base not in keep:
            fs.delete_file(info.path)  # a name an earlier, larger commit had: no duplicate survives
    if fs.get_file_info(st.file(METRICS)).type == pafs.FileType.File:
        fs.copy_file(st.file(METRICS), f"{final}/{METRICS}")
    else:
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(f"{final}/{METRICS}")
    markers.write_json(fs, f"{final}/{MANIFEST}", manifest)
    held.check()
    markers.write_json(fs, f"{final}/{SUCCESS}", success)
    st.discard()
