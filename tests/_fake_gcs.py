"""A stand-in for Google Cloud Storage in tests: ``gs://BUCKET/PATH`` stored under a local directory.

Everything varjax does with a ``gs://`` path goes through the two layers Orbax also uses, so both are
redirected: ``etils.epath`` (its ``gs`` backend becomes :class:`MappedBackend`) and TensorStore (Orbax's
GCS kvstore spec becomes a ``file`` spec at the mapped place). The paths varjax sees and stores stay
``gs://`` URLs throughout, so any code that turned one into a local path (``os.path.abspath``, ``pathlib``)
would write under the working directory instead, which the tests check stays empty.
"""

from __future__ import annotations

import os
import shutil

from etils.epath import backend as epath_backend
from etils.epath import gpath

PREFIX = "gs://"


class MappedBackend(epath_backend._OsPathBackend):  # noqa: SLF001 - the local backend, with paths mapped
    def __init__(self, root: str):
        self.root = root

    def _m(self, path) -> str:
        p = os.fspath(path)
        return os.path.join(self.root, p[len(PREFIX):]) if p.startswith(PREFIX) else p

    def _back(self, local: str) -> str:
        return PREFIX + os.path.relpath(local, self.root)

    def open(self, path, mode):
        if any(m in mode for m in "wa"):
            os.makedirs(os.path.dirname(self._m(path)), exist_ok=True)  # object stores have no directories
        return super().open(self._m(path), mode)

    def exists(self, path):
        return super().exists(self._m(path))

    def isdir(self, path):
        return super().isdir(self._m(path))

    def listdir(self, path):
        return super().listdir(self._m(path))

    def glob(self, path):
        return [self._back(p) for p in super().glob(self._m(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for d, dirs, files in super().walk(self._m(top), top_down=top_down, on_error=on_error):
            yield self._back(os.fspath(d)), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        return super().makedirs(self._m(path), exist_ok=exist_ok, **({} if mode is None else {"mode": mode}))

    def mkdir(self, path, *, exist_ok=False, mode=None):
        os.makedirs(os.path.dirname(self._m(path)), exist_ok=True)
        return super().mkdir(self._m(path), exist_ok=exist_ok, **({} if mode is None else {"mode": mode}))

    def rmtree(self, path):
        return super().rmtree(self._m(path))

    def remove(self, path):
        return super().remove(self._m(path))

    def rename(self, path, dst):
        return super().rename(self._m(path), self._m(dst))

    def replace(self, path, dst):
        return super().replace(self._m(path), self._m(dst))

    def copy(self, path, dst, overwrite):
        return super().copy(self._m(path), self._m(dst), overwrite)

    def stat(self, path):
        return super().stat(self._m(path))


def install(monkeypatch, root: str) -> MappedBackend:
    """Routes ``gs://`` to ``root`` for epath and Orbax/TensorStore for the duration of a test."""
    from orbax.checkpoint._src.path import gcs_utils

    backend = MappedBackend(root)
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", backend)  # noqa: SLF001
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)

    def kvstore(ckpt_path: str) -> dict:
        return {"driver": "file", "path": backend._m(ckpt_path)}  # noqa: SLF001

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    monkeypatch.setattr(gcs_utils, "rmtree", lambda path, missing_ok=False: shutil.rmtree(
        backend._m(path), ignore_errors=missing_ok))  # noqa: SLF001
    return backend
