"""Where the data layer keeps what it derives (fingerprints, preprocessed arrays, synthetic
folders), and crash-safe writes.

Location: ``$SSLSEG_CACHE`` if set, else ``~/.cache/sslseg``. Every entry is keyed by a hash of
what it was derived from, so a stale entry is never found, let alone reused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def cache_root() -> Path:
    """``$SSLSEG_CACHE`` or ``~/.cache/sslseg`` (not created here)."""
    env = os.environ.get("SSLSEG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sslseg"


def stable_hash(obj: object, length: int = 16) -> str:
    """Hex digest of the canonical JSON of ``obj`` (sorted keys), ``length`` characters."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def files_key(paths: Iterable[Path | str]) -> str:
    """Hash of the files' paths, sizes and modification times: changes when any file does."""
    stamps = []
    for p in sorted({str(Path(p).resolve()) for p in paths}):
        st = os.stat(p)
        stamps.append((p, st.st_size, st.st_mtime_ns))
    return stable_hash(stamps, 32)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace`` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode())


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` (uncompressed, so it can be memory-mapped) through a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_json(path: Path, obj: object) -> None:
    """Pretty JSON, written atomically."""
    buf = io.StringIO()
    json.dump(obj, buf, indent=2, default=_json_default)
    atomic_write_text(path, buf.getvalue() + "\n")


def read_memo(path: Path) -> dict:
    """A memo of per-file results (``{key: value}``) saved by :func:`write_memo`; empty when the file
    is missing or damaged (which only costs recomputing what it held)."""
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def write_memo(path: Path, memo: dict) -> None:
    """Save a memo atomically; a read-only cache is not an error (the next run recomputes)."""
    try:
        atomic_write_text(path, json.dumps(memo))
    except OSError:
        pass


def _json_default(x: object) -> object:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
