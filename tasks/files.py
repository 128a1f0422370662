"""Files that are either whole or absent: results, records and reports are written to a temporary file beside
their destination and moved onto it with ``os.replace``, so a job killed while writing leaves the previous
version intact (the move is atomic within a file system)."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside ``path``; moved onto ``path`` when the block ends, removed when it raises.
    Creates the parent folder. The temporary name is hidden (a leading dot, which ``glob`` patterns such as
    ``*.json`` skip, so a file left by a killed process is never read as a result) and keeps the suffix, for
    writers that pick the format from it (matplotlib's ``savefig``, PIL's ``save``)."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    stem, suffix = os.path.splitext(name)
    tmp = os.path.join(folder, f".{stem}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically, flushed to disk before the move."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(path: str | os.PathLike, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1))


def read_json(path: str | os.PathLike):
    """The JSON document in ``path``; None when the file does not exist or holds no whole document."""
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
