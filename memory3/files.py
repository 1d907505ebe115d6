"""Durable writes shared by every on-disk format (token shards, banks, datastores, checkpoints):
write a temp file, fsync it, rename it over the target, fsync the folder. A kill at any moment
leaves either the old file or the new one, never a torn one."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


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


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


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
