"""Paths of everything varjax reads and writes, local or remote (``gs://``, ``s3://``...), via ``etils.epath``.

``etils.epath`` is what Orbax uses, so workdirs, model directories, token caches, sweep roots and the JSON,
PNG and metrics files beside them all go through one layer: a URL stays a URL (never ``os.path.abspath``),
a local path becomes absolute (Orbax needs absolute local paths). Writes of whole files are atomic on local
disk (temporary file + rename); object stores write whole objects atomically themselves.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

from etils import epath

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
    """True for ``scheme://...`` paths (remote file systems)."""
    return "://" in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
    """``epath.Path`` of ``path``: URLs unchanged, local paths made absolute."""
    text = os.fspath(path)
    return epath.Path(text if is_url(text) else os.path.abspath(text))


def write_bytes(path: PathLike, data: bytes) -> None:
    """Writes a whole file (parent directories created); atomic on local disk."""
    p = resolve(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if is_url(p):
        p.write_bytes(data)
        return
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, p)  # readers never see a half-written file


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: PathLike, obj: Any) -> None:
    """Pretty JSON (values JSON cannot hold written as their repr)."""
    write_text(path, json.dumps(obj, indent=2, default=repr) + "\n")


def read_json(path: PathLike) -> Any:
    return json.loads(resolve(path).read_text())


def save_npy_bytes(array) -> bytes:
    """``.npy`` bytes of an array (for :func:`write_bytes`)."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def write_npz(path: PathLike, **arrays) -> None:
    """``np.savez`` of ``arrays`` to a local path or URL (atomic on local disk)."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue())
