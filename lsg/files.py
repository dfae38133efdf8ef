"""Files on disk: atomic writes and content digests, shared by every store of the project.

A result file is written to `<name>.tmp` and renamed over the target (`os.replace` is atomic
on POSIX), so a crash or a kill mid-write leaves the previous file intact, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

READ_CHUNK_BYTES = 1 << 20  # bytes hashed per read by `sha256_file`
FINGERPRINT_HEX_DIGITS = 16  # hex digits of a weights / tokenizer fingerprint (64 bits): names a model version


@contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed over `path` when the block ends
    without error (parents created). The temporary name carries the process id, so DDP ranks
    writing one file at once never share a temporary file.

    Yields:
        the temporary path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file and a rename (parents created).

    Returns:
        `path` as a `Path`.
    """
    with atomic_target(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, data: Any, indent: int | None = None) -> Path:
    """`atomic_write_text` of `json.dumps(data)` (values JSON cannot hold are written as `str`)."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=str))


def read_json(path: str | Path) -> Any | None:
    """A JSON file's content, or None when it is absent or unreadable (a cache then starts afresh)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in `READ_CHUNK_BYTES` chunks.

    Raises:
        FileNotFoundError: no such file.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(READ_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(data: Any) -> str:
    """Hex sha256 of `data` as canonical JSON (sorted keys; other values as `str`)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
