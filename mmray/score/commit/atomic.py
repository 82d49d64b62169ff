"""Local-disk primitives of the commit: fsync, whole-file replacement, and the directory swap.

A local publish is only as atomic as these: a file becomes visible whole or not at all (temporary file,
fsync, rename), and a partition directory is replaced in one step (``renameat2(RENAME_EXCHANGE)``,
reached through ctypes since Python has no binding), or, where the filesystem has no exchange (NFS),
in two renames that the next run repairs if it was killed between them (``staging.clean_stale_staging``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import uuid

__all__ = ["exchange", "fsync", "fsync_tree", "rename_into_place", "replace_file"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def fsync(path: str) -> None:
    """Best effort: flushes one file or directory entry list to disk."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(path: str) -> None:
    """Flushes staged files before the rename makes them visible (a crash must not expose torn files)."""
    for root, _, files in os.walk(path):
        for name in files:
            fsync(os.path.join(root, name))
        fsync(root)


def replace_file(path: str, data: bytes) -> None:
    """Writes ``path`` via a temporary file, fsync and rename, so no reader ever sees it half-written."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(os.path.dirname(path))


def exchange(a: str, b: str) -> bool:
    """Atomically swaps two paths (Linux ``renameat2``); False where the call is unavailable."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


def rename_into_place(staging: str, final: str, run_id: str) -> None:
    """Makes the directory ``staging`` the directory ``final``, replacing what was there in one step
    where the filesystem allows it."""
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    try:
        os.rename(staging, final)  # atomic; succeeds when the target is absent (or an empty directory)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        if exchange(staging, final):
            shutil.rmtree(staging)  # it now holds the previous partition
        else:
            # No atomic swap here: a short window without the partition (documented fallback). Killed
            # between the renames, the next run restores the target from ``old`` (clean_stale_staging).
            old = os.path.join(parent, f"_old-{run_id}-{os.path.basename(final)}")
            os.rename(final, old)
            fsync(parent)
            os.rename(staging, final)
            fsync(parent)
            shutil.rmtree(old)
    fsync(parent)
