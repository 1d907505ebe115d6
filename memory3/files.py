"""Durable writes shared by every on-disk format (token shards, banks, datastores, checkpoints):
write a temp file, fsync it, rename it over the target, fsync the folder. A kill at any moment
leaves either the old file or the new one, never a torn one. And the one-writer lock that keeps
two processes from writing one folder (`hold_write_lock`).

Running out of space (issue 14 section 3): a write that fails with ENOSPC (device full), EFBIG
(the file size limit, `ulimit -f`) or EDQUOT (quota) removes its temp file and raises an OSError
naming the file it was writing, never the temp; the target is left as it was. Each job turns that
into its own error type with `no_space_as` (one line from the `memory3` command, naming the file),
and, since nothing committed was replaced, the same command resumes once space is freed.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

LOCK_FILE = "write.lock"
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
NO_SPACE = "no space left on the device (or the file size limit)"


def out_of_space(e: BaseException) -> bool:
    """Whether `e` is a write that failed for want of space: device full, file size limit or
    quota."""
    return isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS


def no_space_message(path: Path | str, e: OSError) -> str:
    return (f"cannot write {path}: {NO_SPACE} ({os.strerror(e.errno)}); what was committed "
            f"before is intact: free space, then run the same command again to resume")


@contextlib.contextmanager
def no_space_as(error: type[Exception], path: Path | str | None = None) -> Iterator[None]:
    """Turn a write in the block that runs out of space into `error`, naming the file being
    written (the OSError's, else `path`); other errors pass unchanged."""
    try:
        yield
    except OSError as e:
        if not out_of_space(e):
            raise
        raise error(no_space_message(e.filename or path or "a file", e)) from e


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    if os.name == "posix":  # makes the rename itself durable
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_streamed(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Replace `path` atomically by what `write` writes into the open file. On any error the temp
    file is removed and `path` left as it was; an OSError for want of space names `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if out_of_space(e):
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    write_streamed(path, lambda f: f.write(data))


def write_json_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


def read_manifest(folder: Path, fmt: str, version: int, error: type[Exception], *,
                  missing: str, outdated: str) -> dict[str, Any]:
    """folder/manifest.json of format `fmt` and `version`, or `error` naming the file and saying
    what is wrong: `missing` explains an absent manifest, `outdated` what to do about a version."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise error(f"{path} does not exist: {missing}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise error(f"{path} is not a {fmt} manifest")
    if manifest.get("version") != version:
        raise error(f"{path} has format version {manifest.get('version')}, this code reads "
                    f"version {version}; {outdated}")
    return manifest


def require_folder(folder: Path, error: type[Exception], purpose: str) -> None:
    """Raise `error` if `folder`, or the nearest of its parents that exists, is a file: checked
    before any work, so a job does not fail only once it comes to write."""
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                below = "" if path == folder else f", so {folder} cannot be made below it"
                raise error(f"{path} is a file{below}; expected a folder {purpose}")
            return


def hold_write_lock(folder: Path, error: type[Exception]) -> IO[str]:
    """Become the one process writing `folder`: an exclusive flock on folder/write.lock, which
    records its holder (pid, host, start) for the message a second writer gets. The lock lasts
    while the returned file stays open. The kernel drops a flock when its process dies, so a lock
    left by a killed writer is simply taken over by the next one (the record is rewritten)."""
    require_folder(folder, error, "(new or existing) to write into")
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.seek(0)
        holder = f.read().strip() or "holder unknown"
        f.close()
        raise error(f"{folder / LOCK_FILE} is locked: another process is writing {folder} "
                    f"({holder}); wait for it to end or use another folder") from e
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
    except OSError as e:
        f.close()
        if out_of_space(e):
            raise error(no_space_message(folder / LOCK_FILE, e)) from e
        raise
    return f
