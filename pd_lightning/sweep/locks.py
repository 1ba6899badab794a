"""Cross-process locks of a sweep: a file lock per cache entry, and the study lock every claim happens under.

File locks are `filelock`'s (flock on POSIX: the OS releases them when the holder dies, so a killed
builder never leaves a cache entry locked). The study lock is a PostgreSQL advisory lock when the study
lives in PostgreSQL (workers on several machines share it), else a file lock beside the sqlite file.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` held while the block runs (its folder is created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):
        yield


@contextlib.contextmanager
def study_lock(storage_url: str, study_name: str) -> Iterator[None]:
    """Serialise claims across workers: a PostgreSQL advisory lock, else a file lock beside the sqlite file."""
    if storage_url.startswith("postgresql"):
        import sqlalchemy

        key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
        with _lock_engine(storage_url).connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        return
    path = Path(storage_url.split("///", 1)[-1]) if storage_url.startswith("sqlite:///") else Path.cwd() / "optuna"
    with file_lock(path.with_name(f".{path.name}.{study_name}.lock")):
        yield


_ENGINES: dict[str, Any] = {}


def _lock_engine(url: str):
    """One engine per database and process (pre-ping: a connection dropped by a server restart is replaced)."""
    import sqlalchemy

    if url not in _ENGINES:
        _ENGINES[url] = sqlalchemy.create_engine(url, pool_pre_ping=True)
    return _ENGINES[url]
