"""Read and write PyTorch checkpoints and safetensors files without torch and without running their code.

A ``torch.save`` file (torch >= 1.6, the zip format) is a zip archive::

    <archive>/data.pkl          pickle of the object; tensors are `_rebuild_tensor_v2(...)` calls whose
                                storage is a persistent id ('storage', <type>, <key>, <location>, <numel>)
    <archive>/data/<key>        raw bytes of one storage (little-endian unless `byteorder` says otherwise)
    <archive>/byteorder         'little' or 'big' (absent in old files: little)
    <archive>/version           format version

A legacy ``torch.save`` file (torch < 1.6, or ``_use_new_zipfile_serialization=False``) is a stream::

    pickle of the magic number 0x1950a86a20f9469cfc6c
    pickle of the protocol version 1001
    pickle of a sys_info dict (byte order, C type sizes)
    pickle of the object; storages are persistent ids
        ('storage', <type>, <key>, <location>, <numel>, <view metadata or None>)
    pickle of the list of storage keys
    per key, in that order: <numel> as 8-byte little-endian int, then the raw bytes (always little-endian)

Unpickling normally imports and calls whatever globals the pickle names, so a crafted file can run any
code. The reader here resolves globals through a fixed allow-list of inert stand-ins (the tensor and
parameter rebuild functions, the storage types, `collections.OrderedDict`); any other global is refused
with `UnsafeCheckpointError` before anything is called. The header pickles of the legacy format (ints, a
dict, a list of strings) are read by an unpickler that allows no global at all. Tensors come out of the
pickle as descriptions (storage key, dtype, offset, shape, strides); their bytes are read from the file
only when an array is materialized, so `load_state_dict(path, key=...)` reads only the selected part of a
large file.

Storages are read straight from the file, one window per tensor (the bytes between the tensor's first
and last element), which keeps peak memory near one copy of the selected tensors even when many tensors
are views of one flat storage.

Safetensors files go through `safetensors.safe_open(..., framework="np")`; importing `ml_dtypes` here
registers bfloat16 with numpy so BF16 tensors load as `ml_dtypes.bfloat16`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import safetensors

from varjax.core import paths

PathLike = str | os.PathLike

# Legacy typed storage classes: the storage type names the dtype (`_rebuild_tensor_v2`).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("bool"),
    "ComplexFloatStorage": np.dtype("<c8"),
    "ComplexDoubleStorage": np.dtype("<c16"),
}
# Newer dtypes torch saves as an untyped byte storage plus a `torch.<dtype>` global (`_rebuild_tensor_v3`).
_V3_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(dtype)
    for name, dtype in {
        "uint16": "<u2",
        "uint32": "<u4",
        "uint64": "<u8",
        "float8_e5m2": getattr(ml_dtypes, "float8_e5m2", None),
        "float8_e4m3fn": getattr(ml_dtypes, "float8_e4m3fn", None),
        "float8_e5m2fnuz": getattr(ml_dtypes, "float8_e5m2fnuz", None),
        "float8_e4m3fnuz": getattr(ml_dtypes, "float8_e4m3fnuz", None),
        "float8_e8m0fnu": getattr(ml_dtypes, "float8_e8m0fnu", None),
    }.items()
    if dtype is not None
}
_STORAGE_NAME_OF_DTYPE = {dtype: name for name, dtype in _STORAGE_DTYPES.items()}
_V3_NAME_OF_DTYPE = {dtype: name for name, dtype in _V3_DTYPES.items()}
_UNTYPED_STORAGE = ("torch.storage", "UntypedStorage")
_TENSOR_METADATA_FLAGS = ("conj", "neg")

_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
# The legacy format starts with a pickle of this number, then one of this protocol version.
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001
# How a pickle spells the magic number: LONG1 (protocol >= 2, after PROTO and maybe FRAME) or text LONG (0, 1).
_LEGACY_MAGIC_LONG1 = b"\x8a\n" + _LEGACY_MAGIC_NUMBER.to_bytes(10, "little")
_LEGACY_MAGIC_TEXT = b"L%dL\n" % _LEGACY_MAGIC_NUMBER
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length
_STORAGE_ALIGNMENT = 64  # torch aligns records for memory-mapping (an optimization; readers do not need it)


class UnsafeCheckpointError(ValueError):
    """A checkpoint's pickle names a global outside the allow-list; nothing from it was executed."""


# ----------------------------------------------------------------------------------------------------
# Inert stand-ins the unpickler hands out instead of real torch objects.


class _Inert:
    """Base of every object the unpickler can produce besides builtin containers and scalars.

    A pickle's BUILD opcode calls `__setstate__` (or writes `__dict__`) on any object on its stack; refusing
    it keeps a crafted pickle from rewriting these stand-ins, which are shared module-level objects.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError(f"refused to set state on {self!r}: a tensor state dict never does this")


class _Global(_Inert):
    """A callable allowed global: `module.name` implemented by `fn` on inert values only."""

    __slots__ = ("module", "name", "fn")

    def __init__(self, module: str, name: str, fn: Callable[..., Any]):
        self.module, self.name, self.fn = module, name, fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __repr__(self) -> str:
        return f"<global {self.module}.{self.name}>"


class _StorageType(_Inert):
    """A storage class global, e.g. `torch.FloatStorage` (dtype float32) or untyped (bytes, dtype None)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype | None):
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"<storage type {self.name}>"


class _TorchDtype(_Inert):
    """A `torch.<dtype>` global, used by `_rebuild_tensor_v3`."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"<torch.{self.name}>"


@dataclasses.dataclass(frozen=True, eq=False)
class _StorageRef(_Inert):
    """One storage of the file: `nbytes` bytes of `dtype` (None: untyped) from byte `start` of record `key`.

    `start` is 0 except for the storage views of the legacy format (a window of a larger root storage).
    """

    key: str
    dtype: np.dtype | None
    nbytes: int
    start: int = 0


@dataclasses.dataclass(frozen=True, eq=False)
class _TensorRecord(_Inert):
    """A tensor as the pickle describes it; offset and strides count elements of `dtype`."""

    storage: _StorageRef
    dtype: np.dtype
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    conj: bool = False
    neg: bool = False


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(isinstance(v, int) and v >= 0 for v in value):
        raise ValueError(f"tensor {what} must be a tuple of non-negative ints, got {value!r}")
    return tuple(int(v) for v in value)


def _tensor_record(storage: Any, offset: Any, size: Any, stride: Any, dtype: np.dtype, metadata: Any):
    """Validates the arguments of a tensor rebuild call and returns its `_TensorRecord`."""
    if not isinstance(storage, _StorageRef):
        raise ValueError(f"tensor storage must come from a persistent id, got {storage!r}")
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"tensor storage offset must be a non-negative int, got {offset!r}")
    shape, strides = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise ValueError(f"tensor size {shape} and stride {strides} differ in length")
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, Mapping) or not set(metadata) <= set(_TENSOR_METADATA_FLAGS):
        raise ValueError(f"unsupported tensor metadata {metadata!r} (only {_TENSOR_METADATA_FLAGS} flags)")
    return _TensorRecord(storage, dtype, offset, shape, strides, bool(metadata.get("conj")), bool(metadata.get("neg")))


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """`torch._utils._rebuild_tensor_v2`: the dtype is the typed storage's."""
    del requires_grad, backward_hooks  # meaningless without autograd
    if not isinstance(storage, _StorageRef) or storage.dtype is None:
        raise ValueError(f"_rebuild_tensor_v2 needs a typed storage, got {storage!r}")
    return _tensor_record(storage, offset, size, stride, storage.dtype, metadata)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    """`torch._utils._rebuild_tensor_v3`: an untyped byte storage read as `dtype`."""
    del requires_grad, backward_hooks
    if not isinstance(dtype, _TorchDtype):
        raise ValueError(f"_rebuild_tensor_v3 needs a torch dtype, got {dtype!r}")
    if not isinstance(storage, _StorageRef) or storage.dtype is not None:
        raise ValueError(f"_rebuild_tensor_v3 needs an untyped storage, got {storage!r}")
    return _tensor_record(storage, offset, size, stride, dtype.dtype, metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    """`torch._utils._rebuild_parameter[_with_state]`: a parameter is its tensor."""
    del requires_grad, backward_hooks, state
    if not isinstance(data, _TensorRecord):
        raise ValueError(f"a parameter must wrap a tensor, got {data!r}")
    return data


def _allowed_globals() -> dict[tuple[str, str], _Inert]:
    """The complete allow-list: (module, name) -> the inert stand-in the pickle receives."""
    allowed: dict[tuple[str, str], _Inert] = {
        ("collections", "OrderedDict"): _Global("collections", "OrderedDict", OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2"): _Global("torch._utils", "_rebuild_tensor_v2", _rebuild_tensor_v2),
        ("torch._utils", "_rebuild_tensor_v3"): _Global("torch._utils", "_rebuild_tensor_v3", _rebuild_tensor_v3),
        ("torch._utils", "_rebuild_parameter"): _Global("torch._utils", "_rebuild_parameter", _rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state"): _Global(
            "torch._utils", "_rebuild_parameter_with_state", _rebuild_parameter
        ),
        _UNTYPED_STORAGE: _StorageType("UntypedStorage", None),
    }
    allowed.update({("torch", n): _StorageType(n, d) for n, d in _STORAGE_DTYPES.items()})
    allowed.update({("torch", n): _TorchDtype(n, d) for n, d in _V3_DTYPES.items()})
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


# ----------------------------------------------------------------------------------------------------
# Unpicklers.

_REFUSED_GLOBAL_HINT = (
    "Unpickling it could run arbitrary code, so nothing from the file was executed. If you trust the file, "
    "load it with torch.load(..., weights_only=False) and re-save only the tensors with "
    "torch.save(model.state_dict(), path)."
)


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a state-dict pickle into containers, scalars and `_TensorRecord`s; refuses every other global.

    Storage persistent ids are handed to `source.storage_ref`, which knows where the bytes are.
    """

    def __init__(self, file: Any, source: _TorchSource):
        # encoding: how str values pickled by Python 2 are decoded (torch.load uses utf-8 as well).
        super().__init__(file, encoding="utf-8")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        # Every way a pickle reaches a global (GLOBAL, STACK_GLOBAL, INST, EXT*) goes through here.
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise UnsafeCheckpointError(
                f"refused to load: the pickle asks for the global '{module}.{name}', which "
                "is not one of the tensor-rebuild functions, storage types or collections.OrderedDict a "
                f"state dict of tensors needs. {_REFUSED_GLOBAL_HINT}"
            )
        return allowed

    def persistent_load(self, pid: Any) -> _StorageRef:
        legacy = self._source.legacy
        fields = "('storage', type, key, location, numel" + (", view_metadata)" if legacy else ")")
        if not (isinstance(pid, tuple) and len(pid) == (6 if legacy else 5) and pid[0] == "storage"):
            raise ValueError(f"unsupported persistent id {pid!r}; expected {fields}")
        _, storage_type, key, location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise ValueError(f"persistent id {pid!r} does not name a storage type")
        if not isinstance(key, str) or not isinstance(location, str) or not isinstance(numel, int) or numel < 0:
            raise ValueError(f"malformed storage persistent id {pid!r}")
        return self._source.storage_ref(key, storage_type.dtype, numel, pid[5] if legacy else None)


class _HeaderUnpickler(pickle.Unpickler):
    """Unpickles the plain header records of the legacy format (ints, dicts, lists, strings); no globals."""

    def __init__(self, file: Any):
        super().__init__(file, encoding="utf-8")

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafeCheckpointError(
            f"refused to load: a header record, which holds only numbers, strings, lists and dicts, asks for "
            f"the global '{module}.{name}'. {_REFUSED_GLOBAL_HINT}"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise ValueError(f"unexpected persistent id {pid!r} in a header record")


# ----------------------------------------------------------------------------------------------------
# Reading torch.save files.


def _itemsize(dtype: np.dtype | None) -> int:
    return 1 if dtype is None else dtype.itemsize


class _TorchSource:
    """An open `torch.save` file: unpickles its object and reads byte windows of its storages.

    Subclasses set `path`, `big_endian`, `legacy` and implement `unpickle`, `storage_ref`, `read_window`
    and `close`.
    """

    path: str
    big_endian: bool
    legacy: bool

    def unpickle(self) -> Any:
        """The pickled object, with tensors as `_TensorRecord`s (no storage bytes are read)."""
        raise NotImplementedError

    def storage_ref(self, key: str, dtype: np.dtype | None, numel: int, view: Any) -> _StorageRef:
        """The storage a persistent id names (`view`: the legacy view metadata, None for a whole storage)."""
        raise NotImplementedError

    def read_window(self, key: str, start: int, length: int) -> bytearray:
        """Bytes [start, start + length) of storage record `key`, read without loading the whole record."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> _TorchSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load_pickle(self, file: Any, source: str) -> Any:
        """Runs the restricted unpickler on `file`; every failure names `source`."""
        try:
            return _StateDictUnpickler(file, self).load()
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(f"{source}: {e}") from None
        except Exception as e:  # a malformed pickle can fail in many ways; report them all the same way
            raise ValueError(f"{source}: not a valid state-dict pickle: {type(e).__name__}: {e}") from e

    def materialize(self, record: _TensorRecord) -> np.ndarray:
        """The tensor as a C-contiguous, writable, little-endian array that owns no shared memory."""
        dtype, shape = record.dtype, record.shape
        if 0 in shape:
            return np.zeros(shape, dtype)
        extent = 1 + sum((n - 1) * s for n, s in zip(shape, record.stride, strict=True))
        start, length = record.offset * dtype.itemsize, extent * dtype.itemsize
        if start + length > record.storage.nbytes:
            # Checked before any strided view: as_strided past the buffer would read foreign memory.
            raise ValueError(
                f"{self.path}: tensor (offset {record.offset}, size {shape}, stride {record.stride}) reaches "
                f"byte {start + length} of storage {record.storage.key!r}, which has {record.storage.nbytes}"
            )
        window = self.read_window(record.storage.key, record.storage.start + start, length)
        array = _strided_copy(_array_from_bytes(window, dtype, self.big_endian), shape, record.stride)
        if record.conj:  # torch's lazy conjugate/negative bits: the stored values are pre-transform
            np.conjugate(array, out=array)
        if record.neg:
            np.negative(array, out=array)
        return array


class _TorchArchive(_TorchSource):
    """An open `torch.save` zip archive: locates its records and reads byte windows of its storages."""

    legacy = False

    def __init__(self, path: PathLike, name: str | None = None):
        self.path = name or os.fspath(path)  # what messages call the file (its URL when read from a local copy)
        try:
            self._zip = zipfile.ZipFile(os.fspath(path))
        except zipfile.BadZipFile as e:
            raise ValueError(f"{self.path}: not a readable zip archive ({e}); expected a torch.save file") from e
        self._file = open(os.fspath(path), "rb")  # a second handle: storages are read by seeking in the raw file
        try:
            self.prefix = self._find_prefix()
            self.big_endian = self._read_byteorder() == "big"
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._zip.close()
        self._file.close()

    def _find_prefix(self) -> str:
        names = self._zip.namelist()
        pickles = [n[: -len("/data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            shown = ", ".join(repr(n) for n in names[:10]) + (" ..." if len(names) > 10 else "")
            found = "no" if not pickles else f"{len(pickles)}"
            raise ValueError(
                f"{self.path}: zip archive has {found} '<archive>/data.pkl' record(s); a torch.save file has "
                f"exactly one, next to '<archive>/data/<key>' storage records. Members: {shown or 'none'}."
            )
        return pickles[0]

    def _read_byteorder(self) -> str:
        name = f"{self.prefix}/byteorder"
        try:
            order = self._zip.read(name).decode("ascii", "replace").strip()
        except KeyError:
            return "little"  # older torch wrote no record; it ran on little-endian machines only
        if order not in ("little", "big"):
            raise ValueError(f"{self.path}: record {name} says {order!r}; expected 'little' or 'big'")
        return order

    def unpickle(self) -> Any:
        member = f"{self.prefix}/data.pkl"
        return self._load_pickle(io.BytesIO(self._zip.read(member)), f"{self.path} ({member})")

    def storage_ref(self, key: str, dtype: np.dtype | None, numel: int, view: Any) -> _StorageRef:
        del view  # the zip format has no storage views
        name, nbytes = f"{self.prefix}/data/{key}", numel * _itemsize(dtype)
        try:
            info = self._zip.getinfo(name)
        except KeyError:
            raise ValueError(f"storage record {name!r} is missing from the archive") from None
        if info.file_size < nbytes:
            raise ValueError(f"storage record {name!r} holds {info.file_size} bytes, the pickle expects {nbytes}")
        return _StorageRef(key, dtype, nbytes)

    def read_window(self, key: str, start: int, length: int) -> bytearray:
        info = self._zip.getinfo(f"{self.prefix}/data/{key}")
        buf = bytearray(length)
        if info.compress_type == zipfile.ZIP_STORED:  # torch writes stored records: seek straight to them
            self._file.seek(info.header_offset)
            signature, name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(self._file.read(_ZIP_LOCAL_HEADER.size))
            if signature != b"PK\x03\x04":
                raise ValueError(f"{self.path}: corrupt zip local header for {info.filename!r}")
            self._file.seek(info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len + start)
            got = self._file.readinto(buf)
        else:  # a re-compressed archive: decompress up to the window
            with self._zip.open(info) as f:
                f.seek(start)
                got = f.readinto(buf)
        if got != length:
            raise ValueError(f"{self.path}: storage {info.filename!r} ended early ({got} of {length} bytes)")
        return buf


class _LegacyTorchFile(_TorchSource):
    """An open legacy (pre-1.6, non-zip) `torch.save` file.

    The storage records follow the pickles, so where each one starts is known only after the object pickle
    (which gives each storage's dtype, hence its record length) and the key list have been read.
    """

    legacy = True
    big_endian = False  # torch writes the storages of this format little-endian on every machine

    def __init__(self, path: PathLike, name: str | None = None):
        self.path = name or os.fspath(path)
        self._file = open(os.fspath(path), "rb")
        self._storages: dict[str, tuple[np.dtype | None, int]] = {}  # key -> (dtype, numel) from the pickle
        self._records: dict[str, int] = {}  # key -> file offset of its bytes, once located
        try:
            self._read_header()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._file.close()

    def _header_record(self, what: str) -> Any:
        try:
            return _HeaderUnpickler(self._file).load()
        except UnsafeCheckpointError as e:
            raise UnsafeCheckpointError(f"{self.path} (legacy torch.save {what}): {e}") from None
        except Exception as e:
            raise ValueError(
                f"{self.path}: the {what} of this legacy (pre-1.6) torch.save file is not a valid pickle: "
                f"{type(e).__name__}: {e}"
            ) from e

    def _read_header(self) -> None:
        magic = self._header_record("magic number")
        if magic != _LEGACY_MAGIC_NUMBER or type(magic) is not int:
            raise ValueError(f"{self.path}: starts with {magic!r}, not the magic number of a torch.save file")
        version = self._header_record("protocol version")
        if version != _LEGACY_PROTOCOL_VERSION or type(version) is not int:
            raise ValueError(
                f"{self.path}: legacy torch.save protocol version {version!r}; only "
                f"{_LEGACY_PROTOCOL_VERSION} (the one every torch version wrote) is supported"
            )
        sys_info = self._header_record("sys_info record")
        if not isinstance(sys_info, dict):
            raise ValueError(f"{self.path}: the legacy sys_info record is a {_describe(sys_info)}, not a dict")

    def unpickle(self) -> Any:
        obj = self._load_pickle(self._file, f"{self.path} (object pickle of the legacy torch.save format)")
        keys = self._header_record("storage key list")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
            raise ValueError(f"{self.path}: the legacy storage key list is not a list of distinct strings")
        self._locate_records(keys)
        return obj

    def storage_ref(self, key: str, dtype: np.dtype | None, numel: int, view: Any) -> _StorageRef:
        known = self._storages.setdefault(key, (dtype, numel))
        if known != (dtype, numel):
            raise ValueError(
                f"storage {key!r} is described twice, as {known[1]} elements of {known[0]} and as {numel} of {dtype}"
            )
        itemsize = _itemsize(dtype)
        if view is None:
            return _StorageRef(key, dtype, numel * itemsize)
        # A view of the root storage `key`: (view key, offset, size), counted in elements.
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)) or not all(
            isinstance(v, int) and v >= 0 for v in view[1:]
        ):
            raise ValueError(f"malformed storage view metadata {view!r}; expected (key, offset, size)")
        _, offset, size = view
        if offset + size > numel:
            raise ValueError(f"storage view {view!r} reaches past the {numel} elements of storage {key!r}")
        return _StorageRef(key, dtype, size * itemsize, offset * itemsize)

    def _locate_records(self, keys: list[str]) -> None:
        """Finds each storage's bytes: the records follow the key list, one per key, in its order."""
        listed = set(keys)
        missing = [k for k in self._storages if k not in listed]
        if missing:
            raise ValueError(f"{self.path}: the storage key list lacks {_preview(missing)}, used by the pickle")
        position, file_size = self._file.tell(), os.fstat(self._file.fileno()).st_size
        for key in keys:
            if key not in self._storages:
                raise ValueError(f"{self.path}: the storage key list names {key!r}, which the pickle never uses")
            dtype, numel = self._storages[key]
            self._file.seek(position)
            head = self._file.read(8)
            if len(head) != 8:
                raise ValueError(f"{self.path}: file ends at byte {file_size}, before the record of storage {key!r}")
            count = int.from_bytes(head, "little", signed=True)
            if count != numel:
                raise ValueError(
                    f"{self.path}: the record of storage {key!r} holds {count} elements, the pickle expects {numel}"
                )
            end = position + 8 + count * _itemsize(dtype)
            if end > file_size:
                raise ValueError(
                    f"{self.path}: file ends at byte {file_size}, inside the record of storage {key!r} (which "
                    f"ends at byte {end}); the file is truncated"
                )
            self._records[key] = position + 8
            position = end

    def read_window(self, key: str, start: int, length: int) -> bytearray:
        buf = bytearray(length)
        self._file.seek(self._records[key] + start)
        got = self._file.readinto(buf)
        if got != length:  # the file shrank after it was opened
            raise ValueError(f"{self.path}: storage {key!r} ended early ({got} of {length} bytes)")
        return buf


def _array_from_bytes(buf: bytearray, dtype: np.dtype, big_endian: bool) -> np.ndarray:
    """1-D array of `dtype` over `buf` (shared, writable); big-endian input is byte-swapped into a copy."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    # A complex number is two floats, each stored in the file's byte order.
    unit = dtype.itemsize // 2 if dtype.kind == "c" else dtype.itemsize
    if big_endian and unit > 1:
        raw = np.ascontiguousarray(raw.reshape(-1, unit)[:, ::-1]).reshape(-1)
    return raw.view(dtype)


def _c_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major strides, in elements, of `shape`."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _strided_copy(flat: np.ndarray, shape: tuple[int, ...], stride: tuple[int, ...]) -> np.ndarray:
    """The (shape, stride) view of `flat` (element 0 = the tensor's first element) as an owned C array.

    Callers guarantee the view stays inside `flat`. A row-major tensor is exactly `flat`, so it is reshaped
    without a copy; anything else (transposes, slices, expands) is gathered into a fresh array.
    """
    if all(s == c for n, s, c in zip(shape, stride, _c_strides(shape), strict=True) if n != 1):
        return flat.reshape(shape)
    itemsize = flat.dtype.itemsize
    # Gather opaque items: as_strided cannot describe some ml_dtypes types (float8) to numpy.
    items = flat.view(np.dtype((np.void, itemsize)))
    view = np.lib.stride_tricks.as_strided(items, shape, tuple(s * itemsize for s in stride), writeable=False)
    return np.array(view, order="C").view(flat.dtype)


# ----------------------------------------------------------------------------------------------------
# Safetensors.


@dataclasses.dataclass(frozen=True)
class _SafetensorsEntry:
    """A tensor of an open safetensors file, read when materialized."""

    name: str


def _sniff(head: bytes, size: int, name: str) -> str:
    """'torch_zip', 'torch_legacy' or 'safetensors', judged by a file's first 32 bytes and its size."""
    if head[:4] in _ZIP_MAGICS:
        return "torch_zip"
    # PROTO, maybe a 9-byte FRAME, then the magic number; or a protocol-0/1 pickle spelling it as text.
    if (head[:1] == b"\x80" and _LEGACY_MAGIC_LONG1 in head[:24]) or head.startswith(_LEGACY_MAGIC_TEXT):
        return "torch_legacy"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 8 + header_len <= size:
            return "safetensors"
    raise ValueError(
        f"{name}: unrecognized checkpoint format (first bytes {head[:8]!r}); expected a torch.save file "
        "(.pth/.pt/.bin: a zip archive starting with 'PK', or the legacy pre-1.6 format starting with a "
        "pickled magic number) or a .safetensors file (8-byte header length + JSON)."
    )


def _sniff_format(path: PathLike, name: str | None = None) -> str:
    """:func:`_sniff` of the file at ``path`` (a local path or a URL); ``name`` is what messages call it."""
    with paths.resolve(path).open("rb") as f:
        head = f.read(32)
        f.seek(0, os.SEEK_END)
        size = f.tell()
    return _sniff(head, size, name or os.fspath(path))


def _open_torch(path: str, fmt: str, name: str | None = None) -> _TorchSource:
    return _LegacyTorchFile(path, name) if fmt == "torch_legacy" else _TorchArchive(path, name)


def _safetensors_error(path: str, e: Exception) -> ValueError:
    return ValueError(f"{path}: not a readable safetensors file: {type(e).__name__}: {e}")


def _load_safetensors(path: str, key: str | None, name: str | None = None) -> dict[str, np.ndarray]:
    """`load_state_dict` for safetensors: select names first, then read only those tensors."""
    shown = name or path
    # The library raises its own exception type for malformed files; those are reported as ValueError.
    try:
        handle = safetensors.safe_open(path, framework="np")
    except Exception as e:
        raise _safetensors_error(shown, e) from e
    with handle as f:
        chosen = _select_state_dict({n: _SafetensorsEntry(n) for n in f.keys()}, key, shown)
        try:
            # Copy: arrays from safe_open may be views of a memory map that closes with the file.
            return {n: np.array(f.get_tensor(entry.name)) for n, entry in chosen.items()}
        except Exception as e:
            raise _safetensors_error(shown, e) from e


# ----------------------------------------------------------------------------------------------------
# Choosing the state dict inside a loaded object.

_Leaf = np.ndarray | _TensorRecord | _SafetensorsEntry
_DEFAULT_KEYS = ("state_dict", "model", "ema")


def _is_leaf(value: Any) -> bool:
    return isinstance(value, np.ndarray | _TensorRecord | _SafetensorsEntry)


def _is_flat(node: Any) -> bool:
    """A mapping without nested mappings: a state dict candidate."""
    return isinstance(node, Mapping) and not any(isinstance(v, Mapping) for v in node.values())


def _preview(names: Sequence[Any], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "") if names else "none"


def _nested_state_dicts(node: Any, prefix: str = "", depth: int = 4) -> list[str]:
    """Dotted paths of the flat mappings nested under `node` (up to `depth` levels), for error hints."""
    if not isinstance(node, Mapping) or depth == 0:
        return []
    paths = []
    for name, value in node.items():
        if isinstance(value, Mapping):
            path = f"{prefix}{name}"
            paths += [path] if _is_flat(value) else _nested_state_dicts(value, path + ".", depth - 1)
    return paths


def _describe(value: Any) -> str:
    if isinstance(value, int | float | bool | str | bytes | type(None)):
        return f"{type(value).__name__} {value!r}"[:80]
    return type(value).__name__.lstrip("_")


def _checked_state_dict(node: Any, node_key: str, path: str) -> dict[str, _Leaf]:
    """`node` (found at dotted `node_key`, '' for the top level) as a plain dict of tensors, else ValueError."""
    where = f"the object at key {node_key!r}" if node_key else "the top-level object"
    if _is_leaf(node):
        raise ValueError(f"{path}: {where} is a single tensor, not a state dict; pass the key of a dict.")
    if not isinstance(node, Mapping):
        raise ValueError(f"{path}: {where} is a {_describe(node)}, not a state dict (a dict of tensors).")
    for name, value in node.items():
        if not isinstance(name, str):
            raise ValueError(f"{path}: {where} has a non-string key {name!r}; state dict keys are strings.")
        if isinstance(value, Mapping):
            nested = _nested_state_dicts(node, f"{node_key}." if node_key else "")
            raise ValueError(
                f"{path}: {where} is not a flat state dict: its entry {name!r} is a dict. Select one dict of "
                f"tensors with key=, one of: {_preview(nested)}."
            )
        if not _is_leaf(value):
            raise ValueError(
                f"{path}: {where} is not a state dict: its entry {name!r} is a {_describe(value)}, not a "
                "tensor. A state dict holds only tensors; select a nested dict of tensors with key= if there is one."
            )
    return dict(node)


def _default_state_dict(tree: Any, path: str) -> tuple[Any, str]:
    """(state dict, its key) when no key is given: the top level, or one obvious nested dict."""
    if not isinstance(tree, Mapping) or _is_flat(tree):
        return tree, ""
    candidates = [k for k in _DEFAULT_KEYS if _is_flat(tree.get(k))]
    if len(candidates) == 1:
        return tree[candidates[0]], candidates[0]
    reason = f"several candidates {candidates}" if candidates else f"none of them under {list(_DEFAULT_KEYS)}"
    raise ValueError(
        f"{path}: the top-level dict holds nested dicts ({reason}), so the state dict to load is ambiguous; "
        f"pass key= with a dotted path. Top-level keys: {_preview(list(tree))}. Nested dicts of tensors: "
        f"{_preview(_nested_state_dicts(tree))}."
    )


def _select_by_key(tree: Any, key: str, path: str) -> tuple[Any, str]:
    """(state dict, key) for dotted `key`, followed through nested dicts; in a flat dict the rest is a prefix.

    Dict keys may contain dots themselves, so at each level the longest matching run of parts wins.
    A flat state dict with keys 'model.a', 'model.b' gives {'a', 'b'} for key='model' (prefix stripped).
    """
    parts, node, walked = key.split("."), tree, []
    while parts:
        where = f"'{'.'.join(walked)}'" if walked else "the top level"
        if not isinstance(node, Mapping):
            raise ValueError(f"{path}: key {key!r}: {where} is a {_describe(node)}, not a dict.")
        match = next((j for j in range(len(parts), 0, -1) if ".".join(parts[:j]) in node), 0)
        if match:
            walked.append(".".join(parts[:match]))
            node, parts = node[walked[-1]], parts[match:]
            continue
        if _is_flat(node):
            prefix = ".".join(parts) + "."
            selected = {k[len(prefix) :]: v for k, v in node.items() if isinstance(k, str) and k.startswith(prefix)}
            if selected:
                return selected, key
            roots = sorted({k.split(".")[0] for k in node if isinstance(k, str)})
            raise ValueError(
                f"{path}: key {key!r}: {where} is a flat state dict with no entries starting with "
                f"{prefix!r}. Its key prefixes: {_preview(roots)}."
            )
        raise ValueError(
            f"{path}: key {key!r}: no entry {parts[0]!r} under {where}. Available keys there: "
            f"{_preview(list(node))}. Nested dicts of tensors in the file: {_preview(_nested_state_dicts(tree))}."
        )
    return node, key


def _select_state_dict(tree: Any, key: str | None, path: str) -> dict[str, _Leaf]:
    node, node_key = _default_state_dict(tree, path) if key is None else _select_by_key(tree, key, path)
    return _checked_state_dict(node, node_key, path)


# ----------------------------------------------------------------------------------------------------
# Public readers.


def _materialize_tree(tree: Any, archive: _TorchSource, source: str) -> Any:
    """Replaces every `_TensorRecord` in nested dicts/lists/tuples by its array (dicts and lists in place)."""
    done: dict[int, Any] = {}  # by id: shared and self-referencing containers are converted once

    def convert(node: Any) -> Any:
        if id(node) in done:
            return done[id(node)]
        if isinstance(node, _TensorRecord):
            done[id(node)] = archive.materialize(node)
        elif isinstance(node, dict | list):
            done[id(node)] = node
            for k, v in node.items() if isinstance(node, dict) else enumerate(node):
                node[k] = convert(v)
        elif isinstance(node, tuple):
            done[id(node)] = tuple(convert(v) for v in node)
        elif isinstance(node, _Inert):
            raise ValueError(f"{source}: holds {node!r}, which only makes sense inside a tensor")
        else:
            return node
        return done[id(node)]

    return convert(tree)


class TorchCheckpoint:
    """An open `torch.save` file whose pickle the restricted unpickler has read; tensor bytes are read on demand.

    Unpickling once and reading only the selected tensors suits files holding more than one state dict, e.g.
    a training checkpoint {'epoch': ..., 'trainer': {'var_wo_ddp': {...}, 'var_opt': {...}}, 'args': {...}},
    whose optimizer moments need never be read. Use it as a context manager::

        with TorchCheckpoint(path) as ckpt:
            if ckpt.has("trainer.var_wo_ddp"):
                sd, epoch = ckpt.state_dict("trainer.var_wo_ddp"), ckpt.value("epoch")

    Dotted keys follow the rules of `load_state_dict`.

    Raises (on opening):
      UnsafeCheckpointError: the pickle names a global outside the state-dict allow-list.
      ValueError: the file is a safetensors file, not a torch checkpoint, or malformed.
    """

    def __init__(self, path: PathLike, *, name: str | None = None):
        """``path``: a local file or a URL (read from a temporary local copy, removed on close); ``name``: what
        messages call the file when ``path`` is already a local copy of it."""
        self.path = name or os.fspath(path)
        self._local = contextlib.ExitStack()
        try:
            local = os.fspath(path) if name else self._local.enter_context(paths.local_copy(path))
            fmt = _sniff_format(local, self.path)
            if fmt == "safetensors":
                raise ValueError(f"{self.path}: is a safetensors file, not a torch pickle; use load_state_dict.")
            self._source = _open_torch(local, fmt, self.path)
        except BaseException:
            self._local.close()
            raise
        try:
            self._tree = self._source.unpickle()  # tensors stay `_TensorRecord`s until selected
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            self._source.close()
        finally:
            self._local.close()

    def __enter__(self) -> TorchCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has(self, key: str) -> bool:
        """Whether dotted `key` names an entry (a nested dict, tensor or plain value) of the pickled object."""
        try:
            _select_by_key(self._tree, key, self.path)
        except ValueError:
            return False
        return True

    def state_dict(self, key: str | None = None) -> dict[str, np.ndarray]:
        """The flat {name: array} state dict at `key`, as `load_state_dict(path, key)` returns it."""
        chosen = _select_state_dict(self._tree, key, self.path)
        # A tensor already materialized by `value` (which converts dicts in place) is returned as it is.
        return {n: self._source.materialize(r) if isinstance(r, _TensorRecord) else r for n, r in chosen.items()}

    def value(self, key: str | None = None) -> Any:
        """The entry at dotted `key` (None: the whole object), every tensor in it read as an array."""
        node = self._tree if key is None else _select_by_key(self._tree, key, self.path)[0]
        return _materialize_tree(node, self._source, self.path)


def load_torch_pickle(path: PathLike) -> Any:
    """Loads a `torch.save` file without torch and without running code from it.

    Args:
      path: a `.pth`/`.pt`/`.bin` file in the zip format (torch >= 1.6) or the legacy format before it.
    Returns:
      The pickled object with every tensor as a C-contiguous little-endian `np.ndarray` of the tensor's
      dtype (bfloat16 and float8 as `ml_dtypes` types); dicts (incl. OrderedDict), lists and tuples are kept.
    Raises:
      UnsafeCheckpointError: the pickle names a global outside the state-dict allow-list.
      ValueError: the file is not a torch checkpoint, or it is malformed.
    """
    with TorchCheckpoint(path) as ckpt:
        return ckpt.value()


def load_state_dict(path: PathLike, key: str | None = None, *, name: str | None = None) -> dict[str, np.ndarray]:
    """Loads a flat {name: array} state dict from a torch checkpoint or a safetensors file.

    The format is judged by content (zip magic, legacy torch magic number or safetensors header), not by
    extension. Only the tensors of the selected state dict are read.

    Args:
      path: `.pth`/`.pt`/`.bin` (torch zip format, or the legacy format before torch 1.6) or `.safetensors`; a
        local path or a URL (read from a temporary local copy).
      key: dotted path of the state dict inside the file, e.g. 'model' or 'trainer.var_wo_ddp'. Inside a
        flat state dict the remaining path is a key prefix that is stripped ('vae' turns 'vae.x' into 'x').
        Without it: the top-level dict if it holds only tensors, else its single nested dict of tensors
        under 'state_dict', 'model' or 'ema'.
    Returns:
      A plain dict (torch files: in the pickle's order) of C-contiguous, writable, little-endian arrays.
    Raises:
      UnsafeCheckpointError: the pickle names a global outside the state-dict allow-list.
      ValueError: unknown format, malformed file, no such key, ambiguous choice, or non-tensor entries.
    """
    shown = name or os.fspath(path)
    with paths.local_copy(path) as local:  # a URL is copied once, read, and the copy removed
        if _sniff_format(local, shown) == "safetensors":
            return _load_safetensors(local, key, shown)
        with TorchCheckpoint(local, name=shown) as ckpt:
            return ckpt.state_dict(key)


def checkpoint_format(path: PathLike) -> str:
    """'torch_zip', 'torch_legacy' or 'safetensors', judged by content (local or a URL); ValueError for anything
    else."""
    return _sniff_format(path)


# ----------------------------------------------------------------------------------------------------
# Writing torch zip checkpoints.


@dataclasses.dataclass(frozen=True)
class _TensorLayout:
    """Where a tensor lives in the written archive: storage index, element offset, shape, strides."""

    storage: int
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _p_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])  # BININT1
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)  # BININT
    encoded = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(encoded)]) + encoded  # LONG1


def _p_str(text: str) -> bytes:
    encoded = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(encoded)) + encoded  # BINUNICODE


def _p_tuple(items: Sequence[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t" if items else b")"  # MARK ... TUPLE, or EMPTY_TUPLE


def _p_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _p_call(func: bytes, args: Sequence[bytes]) -> bytes:
    return func + _p_tuple(args) + b"R"  # REDUCE


def _p_tensor(layout: _TensorLayout, storage: np.ndarray, location: str = "cpu") -> bytes:
    """Pickle opcodes of one tensor, exactly as torch.save writes them (v3 for dtypes without a storage class).

    `location` is the device torch records for the storage ('cpu', 'cuda:0', ...); readers may ignore it.
    """
    legacy_name = _STORAGE_NAME_OF_DTYPE.get(storage.dtype)
    if legacy_name is not None:
        storage_type, numel, rebuild = _p_global("torch", legacy_name), storage.size, "_rebuild_tensor_v2"
    else:
        storage_type, numel, rebuild = _p_global(*_UNTYPED_STORAGE), storage.nbytes, "_rebuild_tensor_v3"
    persistent_id = _p_tuple(
        [_p_str("storage"), storage_type, _p_str(str(layout.storage)), _p_str(location), _p_int(numel)]
    )
    args = [
        persistent_id + b"Q",  # BINPERSID
        _p_int(layout.offset),
        _p_tuple([_p_int(n) for n in layout.shape]),
        _p_tuple([_p_int(s) for s in layout.stride]),
        b"\x89",  # NEWFALSE: requires_grad
        _p_call(_p_global("collections", "OrderedDict"), []),  # backward hooks
    ]
    if legacy_name is None:
        args.append(_p_global("torch", _V3_NAME_OF_DTYPE[storage.dtype]))
    return _p_call(_p_global("torch._utils", rebuild), args)


_PLAIN_TYPES = (type(None), bool, int, float, str)


class _TreePickler:
    """Protocol-2 pickle of nested dicts, lists and tuples of plain values and arrays, as torch.save writes it.

    Every array becomes a tensor on a storage of its own (collected in `storages`, 1-D little-endian). No
    memo is used, so a container reached twice is written twice; a container holding itself is refused.
    Scalars are plain only by exact type (None, bool, int, float, str): numpy scalars become 0-d tensors.
    """

    def __init__(self, location: str = "cpu"):
        self.location = location
        self.storages: list[np.ndarray] = []
        self._open: set[int] = set()  # ids of the containers being written (cycle check)

    def dump(self, obj: Any) -> bytes:
        return b"\x80\x02" + self._value(obj, "the object") + b"."  # PROTO 2 ... STOP

    def _value(self, value: Any, where: str) -> bytes:
        if type(value) in _PLAIN_TYPES:
            return self._plain(value)
        if hasattr(value, "__array__"):
            storage = _to_storage(where, value)
            layout = _TensorLayout(len(self.storages), 0, storage.shape, _c_strides(storage.shape))
            self.storages.append(storage.reshape(-1))
            return _p_tensor(layout, storage, self.location)
        if not isinstance(value, dict | list | tuple):
            raise ValueError(
                f"{where} is a {type(value).__name__}; a torch checkpoint written here holds only dicts, lists, "
                "tuples, None, bool, int, float, str and arrays"
            )
        if id(value) in self._open:
            raise ValueError(f"{where} contains itself; only trees of containers can be written")
        self._open.add(id(value))
        try:
            return self._container(value, where)
        finally:
            self._open.discard(id(value))

    @staticmethod
    def _plain(value: Any) -> bytes:
        if value is None:
            return b"N"  # NONE
        if type(value) is bool:
            return b"\x88" if value else b"\x89"  # NEWTRUE / NEWFALSE
        if type(value) is int:
            return _p_int(value)
        if type(value) is float:
            return b"G" + struct.pack(">d", value)  # BINFLOAT
        return _p_str(value)

    def _container(self, value: dict | list | tuple, where: str) -> bytes:
        if isinstance(value, tuple):
            return _p_tuple([self._value(v, f"{where}[{i}]") for i, v in enumerate(value)])
        if isinstance(value, list):
            items = b"".join(self._value(v, f"{where}[{i}]") for i, v in enumerate(value))
            return b"]" + (b"(" + items + b"e" if value else b"")  # EMPTY_LIST MARK ... APPENDS
        pairs = []
        for k, v in value.items():
            if type(k) not in _PLAIN_TYPES:  # optimizer states key parameters by int; nothing needs more
                raise ValueError(
                    f"{where} has the key {k!r} ({type(k).__name__}); keys must be str, int, float, bool or None"
                )
            pairs.append(self._plain(k) + self._value(v, f"{where}[{k!r}]"))
        setitems = b"(" + b"".join(pairs) + b"u" if pairs else b""  # MARK ... SETITEMS
        if isinstance(value, OrderedDict):  # torch.save(model.state_dict()) pickles an OrderedDict
            return _p_call(_p_global("collections", "OrderedDict"), []) + setitems
        return b"}" + setitems  # EMPTY_DICT


def _aligned_info(name: str, header_offset: int, size: int) -> zipfile.ZipInfo:
    """ZipInfo whose data starts at a multiple of 64 bytes, padded with an 'FB' extra field as torch does."""
    info = zipfile.ZipInfo(name)  # stored, dated 1980-01-01: the output depends only on the contents
    data_start = header_offset + _ZIP_LOCAL_HEADER.size + len(name.encode()) + 4
    if size * 1.05 > zipfile.ZIP64_LIMIT:  # zipfile's own test for appending a 20-byte zip64 extra field
        data_start += 20
    pad = -data_start % _STORAGE_ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return info


def _write_torch_zip(path: PathLike, data_pkl: bytes, storages: Sequence[np.ndarray]):
    """Writes a torch zip archive: the object pickle `data_pkl` and the `storages` (1-D little-endian arrays)
    its persistent ids name by index."""
    records: list[tuple[str, bytes | memoryview]] = [
        ("data.pkl", data_pkl),
        (".format_version", b"1"),
        (".storage_alignment", str(_STORAGE_ALIGNMENT).encode()),
        ("byteorder", b"little"),
    ]
    records += [(f"data/{i}", memoryview(s.reshape(-1).view(np.uint8))) for i, s in enumerate(storages)]
    records.append(("version", b"3\n"))
    # Written to a local file that appears whole at `path` (renamed, or uploaded to a URL): a failed write leaves
    # no truncated file.
    with paths.local_output(path) as partial, open(partial, "wb") as f, \
            zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records:
            zf.writestr(_aligned_info(f"archive/{name}", f.tell(), len(data)), data)


def _to_storage(what: str, value: Any) -> np.ndarray:
    """`value` (described as `what` in errors) as a contiguous little-endian array of a dtype torch can hold."""
    if not hasattr(value, "__array__"):  # numpy and jax arrays; a bare Python number has no dtype to keep
        raise ValueError(f"{what} is a {_describe(value)}; expected an array")
    array = np.asarray(value)
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder not in ("|", "=") else array.dtype
    if dtype not in _STORAGE_NAME_OF_DTYPE and dtype not in _V3_NAME_OF_DTYPE:
        supported = sorted({str(d) for d in (*_STORAGE_DTYPES.values(), *_V3_DTYPES.values())})
        raise ValueError(f"{what} has dtype {array.dtype}; torch tensors support {supported}")
    return np.asarray(array, dtype=dtype, order="C")  # not ascontiguousarray: it turns 0-d into 1-d


def save_state_dict_pth(path: PathLike, state_dict: Mapping[str, Any]) -> None:
    """Writes {name: array} as a zip checkpoint that `torch.load` reads (no torch needed).

    The archive mirrors `torch.save(model.state_dict(), path)`: `archive/data.pkl` (an OrderedDict of
    `_rebuild_tensor_v2` calls whose storages are persistent ids), `archive/data/<i>` (raw little-endian
    bytes, 64-byte aligned), `archive/byteorder` = 'little' and `archive/version` = 3. Every array becomes
    its own C-contiguous tensor, so views (e.g. transposes) are saved as their values. It loads with
    `torch.load(path, weights_only=True)`.

    Args:
      path: output file.
      state_dict: str -> array-like of bool, (u)int8/16/32/64, float16/32/64, bfloat16, float8 or complex.
      (``path`` may be a URL: the archive is written locally and uploaded whole.)
    """
    tensors = OrderedDict()
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise ValueError(f"state dict key {name!r} is a {type(name).__name__}; keys must be strings")
        tensors[name] = _to_storage(f"state dict entry {name!r}", value)
    pickler = _TreePickler()
    data_pkl = pickler.dump(tensors)
    _write_torch_zip(path, data_pkl, pickler.storages)


def save_torch_pickle(path: PathLike, obj: Any, location: str = "cpu") -> None:
    """Writes a nested object as `torch.save(obj, path)` would (zip format, no torch needed).

    For checkpoints that hold more than one state dict, e.g. a training checkpoint {'epoch': 3, 'trainer':
    {'model': {...}, 'opt': {'state': {0: {...}}, 'param_groups': [...]}}, 'args': OrderedDict(...)}. It
    loads with `torch.load(path, weights_only=True)` and with `load_torch_pickle` / `TorchCheckpoint`.

    Args:
      path: output file.
      obj: dicts (OrderedDicts stay OrderedDicts; keys None, bool, int, float or str), lists and tuples of
        None, bool, int, float, str and arrays. Every array (numpy scalars included) becomes its own
        C-contiguous tensor; the dtypes are those of `save_state_dict_pth`.
      location: the device recorded for every storage, e.g. 'cuda:0' as in files saved from a GPU.
    Raises:
      ValueError: a value of another type, an unsupported dtype or a container that holds itself.
    """
    pickler = _TreePickler(location)
    data_pkl = pickler.dump(obj)  # checked in full before the file is created
    _write_torch_zip(path, data_pkl, pickler.storages)
