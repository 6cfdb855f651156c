"""Filesystem errors as one line naming the path and the fix (a full disk, a read-only mount, a
name too long, a file where a folder belongs), and the check that an output folder is writable
before any heavy work starts."""

from __future__ import annotations

import errno
import os
import re
import uuid
from contextlib import contextmanager
from pathlib import Path

from ctrlnet.errors import StorageError, UserError, one_line

_WHY = {
    errno.ENOSPC: (
        "no space left on the device holding {path}",
        "free some space (or choose another folder) and run again",
    ),
    errno.EDQUOT: (
        "the disk quota is exhausted for {path}",
        "free some space (or choose another folder) and run again",
    ),
    errno.EROFS: ("{path} is on a read-only file system", "choose a writable folder"),
    errno.EACCES: ("permission denied writing {path}", "choose a folder you can write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted on {path}", "choose a folder you can write to, or fix its permissions"),
    errno.ENAMETOOLONG: ("a name in {path} is too long for its file system", "choose a shorter name"),
    errno.ENOTDIR: ("a part of {path} is a file, not a folder", "choose a path under a folder"),
    errno.EISDIR: ("{path} is a folder where a file was expected", "choose another path"),
    errno.EBUSY: ("{path} is busy (a mount point, or in use)", "choose a folder inside it or another one"),
}
# Problems with the path the user chose (exit 2); the rest are the storage's (exit 1).
_USER = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.EBUSY}


def error_line(error: OSError, path: str | Path | None = None) -> str:
    """`error` as one line naming the path and what to do."""
    shown = str(path if path is not None else (error.filename or "?"))
    if error.errno in _WHY:
        what, fix = _WHY[error.errno]
        return f"{what.format(path=shown)}: {fix}"
    return f"{shown}: {one_line(error)}"


def as_error(error: OSError, path: str | Path | None = None) -> UserError:
    """The one-line error (UserError or StorageError) for `error`."""
    kind = UserError if error.errno in _USER else StorageError
    return kind(error_line(error, path))


@contextmanager
def one_line_errors(path: str | Path | None = None):
    """OSErrors inside become one line naming `path` (or the failing file) and the fix."""
    try:
        yield
    except OSError as e:
        raise as_error(e, path if path is not None else e.filename) from None
    except Exception as e:  # safetensors' Rust writer: "I/O error: No space left on device (os error 28)"
        code = os_errno(e)
        if code is None:
            raise
        raise as_error(OSError(code, os.strerror(code)), path) from None


def os_errno(error: BaseException) -> int | None:
    """The errno an exception carries: an OSError's, or the "(os error N)" a Rust library's message ends with."""
    if isinstance(error, OSError):
        return error.errno
    found = re.search(r"\(os error (\d+)\)", str(error))
    return int(found.group(1)) if found else None


def check_folder_path(folder: str | Path, what: str = "--output", given: str | None = None) -> Path:
    """`folder` as a local folder to write into: one line when it, or a folder above it, is a
    file, or it is the file system's root."""
    folder, shown = Path(folder), given if given is not None else str(folder)
    if folder.resolve() == Path(folder.resolve().anchor):
        raise UserError(f"{what} {shown} is the file system's root: give a folder for the output")
    for p in (folder, *folder.parents):
        try:
            exists = p.exists()
        except OSError as e:  # ENAMETOOLONG from stat
            raise as_error(e, shown) from None
        if exists:
            if not p.is_dir():
                where = "is a file" if p == folder else f"lies under {p}, which is a file"
                raise UserError(f"{what} {shown} {where}: give a folder")
            break
    return folder


def check_writable(folder: str | Path, what: str = "--output", given: str | None = None) -> None:
    """Write, then remove, a probe file in `folder` (creating it, and removing what this created):
    a read-only mount, a file in the way, a name too long or a full disk is one line now, not
    after minutes of work. Local paths only."""
    folder = check_folder_path(folder, what, given)
    shown = given if given is not None else str(folder)
    created = []
    for p in (folder, *folder.parents):
        if p.exists():
            break
        created.append(p)
    probe = folder / f".ctrlnet-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        with one_line_errors(shown):
            folder.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"ctrlnet")
                f.flush()
                os.fsync(f.fileno())
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
        for p in created:  # deepest first
            try:
                p.rmdir()
            except OSError:
                break
