"""Paths of everything varjax reads and writes, local or remote (``gs://``, ``s3://``...), via ``etils.epath``.

``etils.epath`` is what Orbax uses, so workdirs, model directories, token caches, sample folders, sweep roots,
``.pth`` files and the JSON, PNG, npz and metrics files beside them all go through this one layer: a URL stays a
URL (never ``os.path.abspath`` or ``pathlib``, which turn ``gs://b/x`` into ``gs:/b/x``), a local path becomes
absolute (Orbax needs absolute local paths).

Writes of whole files are atomic on local disk (temporary file + rename); object stores write whole objects
atomically themselves. A write that fails (a full disk, no permission, no credentials) raises
:class:`~varjax.core.errors.StorageError` naming the file, so that a run ends in one paragraph with exit code 1.
Where a library needs a local file (a zip reader that seeks, an image decoder), :func:`local_copy` and
:func:`local_output` stage the bytes through a temporary file: a local path is never built from a URL.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from etils import epath

from varjax.core.errors import StorageError

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
    """True for ``scheme://...`` paths (remote file systems)."""
    return "://" in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
    """``epath.Path`` of ``path``: URLs unchanged, local paths made absolute."""
    text = os.fspath(path)
    return epath.Path(text if is_url(text) else os.path.abspath(os.path.expanduser(text)))


def write_failed(path: PathLike, e: BaseException) -> StorageError:
    """The one paragraph of a failed write of ``path``."""
    reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
    return StorageError(
        f"{path}: could not be written ({reason}). Free space or fix the permissions of its folder (credentials "
        "for a URL), then re-run the same command: finished files and checkpoints are intact, and a run resumes "
        "from its last checkpoint."
    )


def write_bytes(path: PathLike, data: bytes) -> None:
    """Writes a whole file (parent directories created); atomic on local disk.

    Raises:
      StorageError: the file could not be written (naming it).
    """
    p = resolve(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        if is_url(p):
            p.write_bytes(data)
            return
        tmp = p.with_name(p.name + ".tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, p)  # readers never see a half-written file
        finally:
            if tmp.exists():
                tmp.unlink()
    except OSError as e:
        raise write_failed(p, e) from None


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: PathLike, obj: Any) -> None:
    """Pretty JSON (values JSON cannot hold written as their repr)."""
    write_text(path, json.dumps(obj, indent=2, default=repr) + "\n")


def read_json(path: PathLike, what: str = "a JSON file", fix: str = "") -> Any:
    """The parsed JSON of ``path``; a damaged file is a ValueError naming it (``what`` it is, and ``fix``: what to
    do about it)."""
    p = resolve(path)
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not valid JSON ({e}); the file is damaged or was cut short. It is {what}. "
                         f"{fix or 'Delete it or restore it from a copy.'}") from None


def save_npy_bytes(array) -> bytes:
    """``.npy`` bytes of an array (for :func:`write_bytes`)."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def npz_bytes(**arrays) -> bytes:
    """``np.savez`` of ``arrays`` as bytes (for :func:`write_bytes`)."""
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def write_npz(path: PathLike, **arrays) -> None:
    """``np.savez`` of ``arrays`` to a local path or URL (atomic on local disk)."""
    write_bytes(path, npz_bytes(**arrays))


def load_npz(path: PathLike) -> dict:
    """Every array of an ``.npz`` (local path or URL), read whole; no pickles."""
    import numpy as np

    with np.load(io.BytesIO(resolve(path).read_bytes()), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[str]:
    """A local file path holding the bytes of ``path``: the path itself on local disk, a temporary copy of a URL
    (streamed, removed afterwards). For libraries that open and seek a file by name."""
    p = resolve(path)
    if not is_url(p):
        yield os.fspath(p)
        return
    fd, tmp = tempfile.mkstemp(prefix="varjax-", suffix="-" + p.name)
    try:
        with os.fdopen(fd, "wb") as dst, p.open("rb") as src:
            shutil.copyfileobj(src, dst, 1 << 24)
        yield tmp
    finally:
        os.remove(tmp)


@contextlib.contextmanager
def local_output(path: PathLike) -> Iterator[str]:
    """A local file path to write into; when the block ends without an error the file appears at ``path``
    whole (renamed on local disk, uploaded to a URL) and the temporary one is gone. On an error nothing appears.

    Raises:
      StorageError: the file could not be written or uploaded (naming ``path``).
    """
    p = resolve(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        if is_url(p):
            fd, tmp = tempfile.mkstemp(prefix="varjax-", suffix="-" + p.name)
            os.close(fd)
        else:
            tmp = os.fspath(p.with_name(p.name + ".partial"))
    except OSError as e:
        raise write_failed(p, e) from None
    try:
        try:
            yield tmp
        except OSError as e:
            raise write_failed(p, e) from None
        try:
            if is_url(p):
                with open(tmp, "rb") as src, p.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 24)
            else:
                os.replace(tmp, p)
        except OSError as e:
            raise write_failed(p, e) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
