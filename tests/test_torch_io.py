"""Tests for varjax.interop.torch_io: torch checkpoints (zip and legacy formats) and safetensors, read without torch
and without running code.

Malformed and hostile checkpoints are built from hand-written protocol-2 pickle opcodes, so the reader is
tested on files that neither torch nor the writer under test produced.
"""

import os
import pickle
import pickletools
import re
import struct
import zipfile
from collections import OrderedDict

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from tests.conftest import GOLDEN
from varjax.interop.torch_io import (
    TorchCheckpoint,
    UnsafeCheckpointError,
    load_state_dict,
    load_torch_pickle,
    save_state_dict_pth,
    save_torch_pickle,
)

# ------------------------------------------------------------------------------ hand-written pickles


def _str(s: str) -> bytes:
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)  # BININT


def _ints(values) -> bytes:
    return b"(" + b"".join(_int(v) for v in values) + b"t"  # MARK ... TUPLE


def _tensor(
    storage: str, key: str, numel: int, offset: int, size, stride, metadata: bytes = b"", view: bytes | None = None
) -> bytes:
    """`_rebuild_tensor_v2(('storage', torch.<storage>, key, 'cpu', numel), offset, size, stride, ...)`.

    With `view` (opcodes of the legacy format's view metadata, e.g. b'N' for None) the persistent id gets
    that sixth field, as in the legacy format.
    """
    pid = b"(" + _str("storage") + b"ctorch\n" + storage.encode() + b"\n" + _str(key) + _str("cpu") + _int(numel)
    pid += b"" if view is None else view
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n("
        + pid
        + b"tQ"  # TUPLE, BINPERSID
        + _int(offset)
        + _ints(size)
        + _ints(stride)
        + b"\x89ccollections\nOrderedDict\n)R"  # requires_grad=False, backward_hooks=OrderedDict()
        + metadata
        + b"tR"
    )


def _dict(items: dict) -> bytes:
    """EMPTY_DICT MARK key value ... SETITEMS; values are opcodes (bytes) or ints."""
    body = b"".join(_str(k) + (v if isinstance(v, bytes) else _int(v)) for k, v in items.items())
    return b"}(" + body + b"u"


def _pickle(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def _write_zip(path, data_pkl: bytes, storages: dict, byteorder: bytes | None = b"little", prefix="ckpt") -> str:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{prefix}/data.pkl", data_pkl)
        if byteorder is not None:
            z.writestr(f"{prefix}/byteorder", byteorder)
        for key, raw in storages.items():
            z.writestr(f"{prefix}/data/{key}", raw)
        z.writestr(f"{prefix}/version", b"3\n")
    return str(path)


def _write_legacy(path, obj_pkl: bytes, records: list, header_protocol=2, **replace) -> str:
    """A legacy (non-zip) torch.save file: magic, protocol version, sys_info, object pickle, storage keys,
    then per key its element count (8 bytes, little-endian) and raw bytes. `records` is [(key, numel, raw)]
    in file order; `replace` swaps a header record ('version', 'sys_info', 'keys') for the given bytes.
    """
    headers = {
        "magic": 0x1950A86A20F9469CFC6C,
        "version": 1001,
        "sys_info": {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}},
        "keys": [key for key, _, _ in records],
    }
    dumped = {name: replace.get(name, pickle.dumps(v, protocol=header_protocol)) for name, v in headers.items()}
    with open(path, "wb") as f:
        f.write(dumped["magic"] + dumped["version"] + dumped["sys_info"] + obj_pkl + dumped["keys"])
        for _, numel, raw in records:
            f.write(struct.pack("<q", numel) + raw)
    return str(path)


def _w():
    return _tensor("FloatStorage", "0", 2, 0, (2,), (1,))


def _nested_file(tmp_path, body: bytes, name="nested.pth") -> str:
    return _write_zip(tmp_path / name, _pickle(body), {"0": np.array([1.0, 2.0], np.float32).tobytes()})


# ---------------------------------------------------------------------------------- reference files


def test_reads_reference_vqvae_checkpoint():
    sd = load_state_dict(f"{GOLDEN}/vqvae_public.pth")
    assert type(sd) is dict
    assert list(sd)[0] == "encoder.conv_in.weight"  # file order kept
    assert sd["encoder.conv_in.weight"].shape == (32, 3, 3, 3)
    assert sd["quantize.embedding.weight"].shape == (256, 16)
    assert sd["quantize.ema_vocab_hit_SV"].shape == (6, 256)
    for k, v in sd.items():
        assert v.dtype == np.float32 and v.flags.c_contiguous, k
        assert np.isfinite(v).all(), k
    assert np.abs(sd["quantize.embedding.weight"]).max() > 0


def test_reads_reference_var_checkpoint():
    sd = load_state_dict(f"{GOLDEN}/var_public.pth")
    lvl = sd["lvl_1L"]
    assert lvl.dtype == np.int64 and lvl.shape == (1, 130)
    # scale index of each token: 1, 4, 9, 16, 36, 64 tokens for patch sizes 1, 2, 3, 4, 6, 8
    np.testing.assert_array_equal(np.bincount(lvl[0]), [1, 4, 9, 16, 36, 64])
    bias = sd["attn_bias_for_masking"]
    assert bias.shape == (1, 1, 130, 130) and bias.dtype == np.float32
    assert set(np.unique(bias)) == {0.0, -np.inf}  # block-causal mask
    assert sd["blocks.0.attn.zero_k_bias"].shape == (128,)
    assert sd["class_emb.weight"].shape == (11, 128)
    for k, v in sd.items():
        if k not in ("lvl_1L", "attn_bias_for_masking"):
            assert v.dtype == np.float32 and np.isfinite(v).all(), k


# ------------------------------------------------------------------------------------------ writer


def _sample_state_dict():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 7)).astype(np.float32)
    return {
        "transposed": x.T,  # non-contiguous input
        "strided": x[::2, 1::3].astype(np.float64),
        "bf16": x.astype(ml_dtypes.bfloat16),
        "half": x[:2].astype(np.float16),
        "f8": np.array([0.5, -2.0, 448.0], ml_dtypes.float8_e4m3fn),  # torch's untyped-storage (v3) path
        "u16": np.array([0, 65535], np.uint16),
        "c64": (x[0] + 1j * x[1]).astype(np.complex64),
        "i64": np.arange(-3, 9, dtype=np.int64).reshape(3, 4),
        "i8": np.array([-128, 0, 127], dtype=np.int8),
        "mask": np.array([[True, False], [False, True]]),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "big_endian": np.arange(4, dtype=">i4"),
    }


def test_save_load_round_trip(tmp_path):
    sd = _sample_state_dict()
    path = tmp_path / "sd.pth"
    save_state_dict_pth(path, sd)
    back = load_state_dict(path)
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape, k
        assert back[k].dtype == v.dtype.newbyteorder("<"), k
        assert back[k].flags.c_contiguous and back[k].flags.writeable, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    assert back["scalar"].ndim == 0


def test_written_archive_has_torch_layout(tmp_path):
    path = tmp_path / "sd.pth"
    save_state_dict_pth(path, {"a": np.ones((3, 3), np.float32), "b": np.zeros(5, np.int64)})
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        assert names[0] == "archive/data.pkl" and names[-1] == "archive/version"
        assert {"archive/byteorder", "archive/data/0", "archive/data/1"} <= set(names)
        assert z.read("archive/version") == b"3\n"
        assert z.read("archive/byteorder") == b"little"
        assert z.read("archive/data/1") == np.zeros(5, "<i8").tobytes()
        globals_used = {arg for op, arg, _ in pickletools.genops(z.read("archive/data.pkl")) if op.name == "GLOBAL"}
        infos = z.infolist()
    assert globals_used == {
        "collections OrderedDict",
        "torch._utils _rebuild_tensor_v2",
        "torch FloatStorage",
        "torch LongStorage",
    }
    raw = path.read_bytes()
    for info in infos:  # the data of every record starts at a 64-byte boundary, as torch writes it
        name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
        assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
    assert os.listdir(tmp_path) == ["sd.pth"]  # no partial file left behind


def test_save_refuses_unsupported_values(tmp_path):
    with pytest.raises(ValueError, match=r"'s' has dtype <U1"):
        save_state_dict_pth(tmp_path / "x.pth", {"w": np.ones(2), "s": np.array(["a"])})
    with pytest.raises(ValueError, match=r"'f' is a float 1\.5; expected an array"):
        save_state_dict_pth(tmp_path / "x.pth", {"f": 1.5})
    with pytest.raises(ValueError, match=r"key 3 is a int"):
        save_state_dict_pth(tmp_path / "x.pth", {3: np.ones(2)})
    assert not os.listdir(tmp_path)


def _training_checkpoint():
    """Nested like a training checkpoint: int-keyed optimizer state, tuples, OrderedDicts, plain values."""
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    return {
        "epoch": 3,
        "trainer": {
            "model": OrderedDict([("w", w), ("b", np.zeros(3, ml_dtypes.bfloat16))]),
            "opt": {
                "state": {0: {"step": np.array(2.0, np.float32), "exp_avg": w * 0.5}},
                "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "foreach": None, "fused": True, "params": [0]}],
            },
            "scaler": {},
        },
        "args": OrderedDict([("pn", "1_2_3"), ("patch_nums", (1, 2, 3)), ("seed", None), ("huge", 2**70)]),
        "history": [[], (), "é", -0.0, float("inf"), -(2**40)],
    }


def _assert_same_tree(got, want):
    assert type(got) is type(want), (got, want)
    if isinstance(want, dict):
        assert list(got) == list(want)
        for k in want:
            _assert_same_tree(got[k], want[k])
    elif isinstance(want, list | tuple):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            _assert_same_tree(a, b)
    elif isinstance(want, np.ndarray):
        assert (got.dtype, got.shape) == (want.dtype, want.shape) and got.tobytes() == want.tobytes()
    else:
        assert repr(got) == repr(want)


@pytest.mark.parametrize("location", ["cpu", "cuda:0"])
def test_nested_checkpoint_round_trip(tmp_path, location):
    obj = _training_checkpoint()
    path = tmp_path / "ckpt.pth"
    save_torch_pickle(path, obj, location=location)
    _assert_same_tree(load_torch_pickle(path), obj)
    with zipfile.ZipFile(path) as z:
        ops = list(pickletools.genops(z.read("archive/data.pkl")))
    assert {arg for op, arg, _ in ops if op.name == "GLOBAL"} == {
        "collections OrderedDict",
        "torch._utils _rebuild_tensor_v2",
        "torch FloatStorage",
        "torch BFloat16Storage",
    }
    assert location in {arg for op, arg, _ in ops if op.name == "BINUNICODE"}


def test_checkpoint_reads_only_the_selected_parts(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_torch_pickle(path, _training_checkpoint())
    with TorchCheckpoint(path) as ckpt:
        assert ckpt.has("trainer.model") and ckpt.has("epoch") and not ckpt.has("trainer.ema")
        assert ckpt.value("epoch") == 3 and ckpt.value("args")["patch_nums"] == (1, 2, 3)
        assert list(ckpt.state_dict("trainer.model")) == ["w", "b"]
        trainer = ckpt.value("trainer")  # read as arrays, then still selectable as a state dict
        np.testing.assert_array_equal(trainer["opt"]["state"][0]["exp_avg"], np.arange(6).reshape(2, 3) * 0.5)
        np.testing.assert_array_equal(ckpt.state_dict("trainer.model")["w"], trainer["model"]["w"])
    with pytest.raises(ValueError, match=r"safetensors file, not a torch pickle"):
        st = tmp_path / "w.safetensors"
        safetensors.numpy.save_file({"w": np.zeros(2, np.float32)}, str(st))
        TorchCheckpoint(st)


@pytest.mark.parametrize(
    "obj, message",
    [
        ({"s": {1, 2}}, r"the object\['s'\] is a set"),
        ({"k": [object()]}, r"the object\['k'\]\[0\] is a object"),
        ({(1, 2): 3}, r"has the key \(1, 2\) \(tuple\)"),
        ({"b": b"raw"}, r"is a bytes"),
        ({"u": np.array(["a"])}, r"the object\['u'\] has dtype <U1"),
    ],
)
def test_nested_writer_refuses_what_it_cannot_write(tmp_path, obj, message):
    with pytest.raises(ValueError, match=message):
        save_torch_pickle(tmp_path / "x.pth", obj)
    cyclic = {"a": []}
    cyclic["a"].append(cyclic)
    with pytest.raises(ValueError, match=r"contains itself"):
        save_torch_pickle(tmp_path / "x.pth", cyclic)
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------------------ reader


def test_views_into_one_storage(tmp_path):
    storage = np.arange(12, dtype=np.float32)
    body = _dict(
        {
            "full": _tensor("FloatStorage", "0", 12, 0, (3, 4), (4, 1)),
            "transposed": _tensor("FloatStorage", "0", 12, 0, (4, 3), (1, 4)),
            "column": _tensor("FloatStorage", "0", 12, 2, (3,), (4,)),
            "row": _tensor("FloatStorage", "0", 12, 4, (4,), (1,)),
            "expanded": _tensor("FloatStorage", "0", 12, 1, (2, 3), (0, 1)),
            "scalar": _tensor("FloatStorage", "0", 12, 7, (), ()),
            "empty": _tensor("FloatStorage", "0", 12, 12, (0, 5), (5, 1)),
        }
    )
    sd = load_state_dict(_write_zip(tmp_path / "views.pth", _pickle(body), {"0": storage.tobytes()}))
    full = storage.reshape(3, 4)
    np.testing.assert_array_equal(sd["full"], full)
    np.testing.assert_array_equal(sd["transposed"], full.T)
    np.testing.assert_array_equal(sd["column"], full[:, 2])
    np.testing.assert_array_equal(sd["row"], full[1])
    np.testing.assert_array_equal(sd["expanded"], [[1, 2, 3], [1, 2, 3]])
    assert sd["scalar"].shape == () and sd["scalar"] == 7
    assert sd["empty"].shape == (0, 5)
    for k, v in sd.items():  # every array is an independent, writable C array
        assert v.flags.c_contiguous and v.flags.writeable, k
    sd["full"][1] = -1
    np.testing.assert_array_equal(sd["row"], full[1])


def test_tensor_metadata_bits_and_parameters(tmp_path):
    values = np.array([1.0, -2.0, 3.0], np.float32)
    neg = b"}" + _str("neg") + b"\x88s"  # {'neg': True}: torch stores a lazily negated view's source values
    param = b"ctorch._utils\n_rebuild_parameter\n(" + _tensor("FloatStorage", "0", 3, 0, (3,), (1,)) + b"\x88)tR"
    body = _dict({"neg": _tensor("FloatStorage", "0", 3, 0, (3,), (1,), metadata=neg), "param": param})
    sd = load_state_dict(_write_zip(tmp_path / "m.pth", _pickle(body), {"0": values.tobytes()}))
    np.testing.assert_array_equal(sd["neg"], -values)
    np.testing.assert_array_equal(sd["param"], values)


def test_big_endian_archive(tmp_path):
    values = np.array([1.5, -2.0, 3.25], dtype=np.float32)
    bf16 = values.astype(ml_dtypes.bfloat16)
    body = _dict(
        {
            "f": _tensor("FloatStorage", "0", 3, 0, (3,), (1,)),
            "b": _tensor("BFloat16Storage", "1", 3, 0, (3,), (1,)),
            "c": _tensor("ComplexFloatStorage", "2", 1, 0, (), ()),
        }
    )
    storages = {
        "0": values.astype(">f4").tobytes(),
        "1": bf16.view(np.uint16).astype(">u2").tobytes(),
        "2": np.array([1.5, -4.0], ">f4").tobytes(),  # each half of a complex number is swapped on its own
    }
    sd = load_state_dict(_write_zip(tmp_path / "be.pth", _pickle(body), storages, byteorder=b"big"))
    np.testing.assert_array_equal(sd["f"], values)
    assert sd["b"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(sd["b"], bf16)
    assert sd["c"] == 1.5 - 4.0j


def test_tensor_reaching_outside_its_storage_is_refused(tmp_path):
    body = _dict({"w": _tensor("FloatStorage", "0", 4, 2, (2, 2), (2, 1))})  # last element would be #5
    path = _write_zip(tmp_path / "oob.pth", _pickle(body), {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(ValueError, match=r"oob\.pth: tensor .* reaches byte 24 of storage '0', which has 16"):
        load_state_dict(path)


def test_missing_or_short_storage_record(tmp_path):
    body = _pickle(_dict({"w": _tensor("FloatStorage", "0", 4, 0, (4,), (1,))}))
    with pytest.raises(ValueError, match=r"a\.pth.*storage record 'ckpt/data/0' is missing"):
        load_state_dict(_write_zip(tmp_path / "a.pth", body, {}))
    with pytest.raises(ValueError, match=r"b\.pth.*'ckpt/data/0' holds 8 bytes, the pickle expects 16"):
        load_state_dict(_write_zip(tmp_path / "b.pth", body, {"0": b"\0" * 8}))


def test_nested_objects_are_kept(tmp_path):
    tensor = _tensor("LongStorage", "0", 2, 0, (2,), (1,))
    body = _dict(
        {
            "epoch": 3,
            "trainer": _dict({"w": tensor}),
            "hist": b"]" + b"(" + _int(1) + tensor + b"e",  # EMPTY_LIST MARK ... APPENDS
            "od": b"ccollections\nOrderedDict\n)R" + b"(" + _str("x") + _int(1) + b"u",
        }
    )
    obj = load_torch_pickle(_write_zip(tmp_path / "n.pth", _pickle(body), {"0": np.array([5, 6], np.int64).tobytes()}))
    assert obj["epoch"] == 3
    np.testing.assert_array_equal(obj["trainer"]["w"], [5, 6])
    assert obj["hist"][0] == 1 and obj["hist"][1].dtype == np.int64
    assert type(obj["od"]) is OrderedDict and obj["od"] == {"x": 1}


# ---------------------------------------------------------------------------------- hostile files


class _Calls:
    """Pickles as a call of `func(arg)`, the classic way a checkpoint runs code when unpickled."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL and STACK_GLOBAL opcodes
@pytest.mark.parametrize("via", ["system", "exec"])
def test_pickle_running_code_is_refused(tmp_path, protocol, via):
    marker = tmp_path / "pwned"
    if via == "system":
        payload, global_name = _Calls(os.system, f"touch {marker}"), f"{os.system.__module__}.system"
    else:
        # protocol 2 spells the module of exec '__builtin__'
        payload, global_name = _Calls(exec, f"open({str(marker)!r}, 'w').close()"), r"(builtins|__builtin__)\.exec"
    path = _write_zip(tmp_path / "evil.pth", pickle.dumps({"w": payload}, protocol=protocol), {})
    with pytest.raises(UnsafeCheckpointError, match=rf"evil\.pth.*'{global_name}'"):
        load_state_dict(path)
    with pytest.raises(UnsafeCheckpointError):
        load_torch_pickle(path)
    assert not marker.exists()


def test_eval_smuggled_next_to_a_real_tensor_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    body = _dict({"w": _w(), "x": b"cbuiltins\neval\n(" + _str(code) + b"tR"})
    path = _write_zip(tmp_path / "evil.pth", _pickle(body), {"0": np.zeros(2, np.float32).tobytes()})
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth.*'builtins\.eval'"):
        load_state_dict(path)
    assert not marker.exists()
    assert issubclass(UnsafeCheckpointError, ValueError)


def test_build_on_an_allowed_global_is_refused(tmp_path):
    # BUILD would set attributes on the shared stand-in for _rebuild_tensor_v2 and change later loads.
    body = b"ctorch._utils\n_rebuild_tensor_v2\n}" + _str("fn") + b"ccollections\nOrderedDict\nsb"
    path = _write_zip(tmp_path / "build.pth", _pickle(body), {})
    with pytest.raises(UnsafeCheckpointError, match=r"build\.pth.*set state"):
        load_torch_pickle(path)
    ok = load_state_dict(_write_zip(tmp_path / "ok.pth", _pickle(_dict({"w": _w()})), {"0": b"\0" * 8}))
    np.testing.assert_array_equal(ok["w"], [0, 0])


def test_malformed_persistent_id_is_refused(tmp_path):
    body = _dict({"w": b"(" + _str("storage") + _str("not a type") + _str("0") + _str("cpu") + _int(2) + b"tQ"})
    with pytest.raises(ValueError, match=r"pid\.pth.*does not name a storage type"):
        load_state_dict(_write_zip(tmp_path / "pid.pth", _pickle(body), {"0": b"\0" * 8}))


# ------------------------------------------------------------------------------------ legacy format


@pytest.mark.parametrize("header_protocol", [0, 2, 4])  # text LONG, LONG1, and LONG1 inside a FRAME
def test_legacy_format(tmp_path, header_protocol):
    floats = np.arange(12, dtype=np.float32)
    longs = np.array([-(2**40), 7], np.int64)
    bf16 = np.array([1.5, -2.0, 0.25, 8.0, -1.0, 3.0], ml_dtypes.bfloat16)
    view = b"(" + _str("view_of_c") + _int(2) + _int(3) + b"t"  # elements 2..4 of storage 'c'
    body = _dict(
        {
            "full": _tensor("FloatStorage", "b", 12, 0, (3, 4), (4, 1), view=b"N"),
            "transposed": _tensor("FloatStorage", "b", 12, 0, (4, 3), (1, 4), view=b"N"),
            "offset_view": _tensor("FloatStorage", "b", 12, 5, (2, 3), (4, 1), view=b"N"),
            "longs": _tensor("LongStorage", "a", 2, 0, (2,), (1,), view=b"N"),
            "bf16_view": _tensor("BFloat16Storage", "c", 6, 1, (2,), (1,), view=view),
            "epoch": 3,
        }
    )
    # Records follow the key list ('a', 'b', 'c'), not the order the pickle first uses the storages.
    records = [("a", 2, longs.tobytes()), ("b", 12, floats.tobytes()), ("c", 6, bf16.view(np.uint16).tobytes())]
    path = _write_legacy(tmp_path / "old.pth", _pickle(body), records, header_protocol)
    obj = load_torch_pickle(path)
    assert obj["epoch"] == 3
    full = floats.reshape(3, 4)
    np.testing.assert_array_equal(obj["full"], full)
    np.testing.assert_array_equal(obj["transposed"], full.T)
    np.testing.assert_array_equal(obj["offset_view"], full[1:, 1:])
    assert obj["longs"].dtype == np.int64
    np.testing.assert_array_equal(obj["longs"], longs)
    assert obj["bf16_view"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(obj["bf16_view"], bf16[3:5])  # storage view starts at 2, tensor offset 1
    column = _dict({"w": _tensor("FloatStorage", "b", 12, 2, (3,), (4,), view=b"N")})
    sd = load_state_dict(_write_legacy(tmp_path / "sd.pth", _pickle(column), records[1:2]))
    assert list(sd) == ["w"] and sd["w"].flags.writeable
    np.testing.assert_array_equal(sd["w"], full[:, 2])


def test_legacy_format_record_errors(tmp_path):
    body = _pickle(_dict({"w": _tensor("FloatStorage", "k", 4, 0, (4,), (1,), view=b"N")}))
    raw = np.ones(4, np.float32).tobytes()
    cases = {
        "count.pth": ([("k", 3, raw[:12])], {}, r"storage 'k' holds 3 elements, the pickle expects 4"),
        "short.pth": ([("k", 4, raw[:10])], {}, r"inside the record of storage 'k'.*truncated"),
        "lacks.pth": ([], {}, r"key list lacks 'k'"),
        "extra.pth": ([("k", 4, raw), ("z", 0, b"")], {}, r"names 'z', which the pickle never uses"),
        "version.pth": ([("k", 4, raw)], {"version": pickle.dumps(1000)}, r"protocol version 1000"),
        "zip_pid.pth": ([("k", 4, raw)], {}, r"expected \('storage', type, key, location, numel, view_metadata\)"),
    }
    for name, (records, replace, message) in cases.items():
        obj = _pickle(_dict({"w": _w()})) if name == "zip_pid.pth" else body  # a 5-field zip-format id
        path = _write_legacy(tmp_path / name, obj, records, **replace)
        with pytest.raises(ValueError, match=re.escape(name) + ".*" + message):
            load_state_dict(path)
    ok = load_state_dict(_write_legacy(tmp_path / "ok.pth", body, [("k", 4, raw)]))
    np.testing.assert_array_equal(ok["w"], np.ones(4))


@pytest.mark.parametrize("protocol", [2, 4])
def test_legacy_object_pickle_running_code_is_refused(tmp_path, protocol):
    marker = tmp_path / "pwned"
    obj = pickle.dumps({"w": _Calls(os.system, f"touch {marker}")}, protocol=protocol)
    path = _write_legacy(tmp_path / "evil.pth", obj, [])
    with pytest.raises(UnsafeCheckpointError, match=rf"evil\.pth \(object pickle.*'{os.system.__module__}\.system'"):
        load_state_dict(path)
    with pytest.raises(UnsafeCheckpointError):
        load_torch_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize("record", ["sys_info", "version", "keys"])
def test_legacy_header_running_code_is_refused(tmp_path, record):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Calls(os.system, f"touch {marker}"), protocol=2)
    body = _pickle(_dict({"w": _tensor("FloatStorage", "k", 2, 0, (2,), (1,), view=b"N")}))
    path = _write_legacy(tmp_path / "evil.pth", body, [("k", 2, b"\0" * 8)], **{record: evil})
    refused = rf"evil\.pth \(legacy torch\.save .*header record.*'{os.system.__module__}\.system'"
    with pytest.raises(UnsafeCheckpointError, match=refused):
        load_state_dict(path)
    assert not marker.exists()
    # The header unpickler allows no global at all, not even the state-dict ones.
    od = pickle.dumps(OrderedDict(a=1), protocol=2)
    with pytest.raises(UnsafeCheckpointError, match=r"'collections\.OrderedDict'"):
        load_state_dict(_write_legacy(tmp_path / "od.pth", body, [("k", 2, b"\0" * 8)], sys_info=od))


# ------------------------------------------------------------------------------------- safetensors


def test_safetensors_round_trip_detected_by_content(tmp_path):
    sd = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "bf16": np.linspace(-1, 1, 5).astype(ml_dtypes.bfloat16),
        "idx": np.arange(4, dtype=np.int64),
    }
    path = tmp_path / "weights.bin"  # the extension says torch; the content says safetensors
    safetensors.numpy.save_file(sd, str(path))
    back = load_state_dict(path)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].flags.writeable, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    with pytest.raises(ValueError, match="safetensors"):
        load_torch_pickle(path)


def test_safetensors_key_selects_a_prefix(tmp_path):
    sd = {"vae.enc.w": np.ones(2, np.float32), "vae.dec.w": np.zeros(3, np.float32), "var.head": np.ones(1)}
    path = tmp_path / "both.safetensors"
    safetensors.numpy.save_file(sd, str(path))
    assert set(load_state_dict(path)) == set(sd)
    vae = load_state_dict(path, key="vae")
    assert set(vae) == {"enc.w", "dec.w"}
    np.testing.assert_array_equal(vae["dec.w"], np.zeros(3))
    assert set(load_state_dict(path, key="vae.enc")) == {"w"}
    with pytest.raises(
        ValueError, match=r"both\.safetensors: key 'vqvae'.*no entries starting with 'vqvae\.'.*'vae', 'var'"
    ):
        load_state_dict(path, key="vqvae")
    with pytest.raises(ValueError, match=r"key 'var\.head' is a single tensor"):
        load_state_dict(path, key="var.head")


def test_corrupt_safetensors_names_the_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    header = b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)  # 4 of the 16 data bytes
    with pytest.raises(ValueError, match=r"bad\.safetensors: not a readable safetensors file"):
        load_state_dict(path)


# ------------------------------------------------------------------------------ state-dict selection


def test_dotted_key_selects_nested_state_dict(tmp_path):
    body = _dict({"epoch": 3, "trainer": _dict({"var_wo_ddp": _dict({"w": _w()}), "step": 5})})
    path = _nested_file(tmp_path, body)
    sd = load_state_dict(path, key="trainer.var_wo_ddp")
    assert list(sd) == ["w"]
    np.testing.assert_array_equal(sd["w"], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"nested\.pth: .*ambiguous.*'epoch', 'trainer'.*'trainer\.var_wo_ddp'"):
        load_state_dict(path)
    with pytest.raises(ValueError, match=r"key 'trainer\.nope': no entry 'nope' under 'trainer'.*'var_wo_ddp', 'step'"):
        load_state_dict(path, key="trainer.nope")
    with pytest.raises(ValueError, match=r"at key 'trainer' is not a flat state dict.*key=.*'trainer\.var_wo_ddp'"):
        load_state_dict(path, key="trainer")
    with pytest.raises(ValueError, match=r"key 'epoch\.x': 'epoch' is a int 3, not a dict"):
        load_state_dict(path, key="epoch.x")


def test_keys_containing_dots(tmp_path):
    path = _nested_file(tmp_path, _dict({"model.ema": _dict({"w": _w()}), "model": _dict({"v": _w()})}))
    assert list(load_state_dict(path, key="model.ema")) == ["w"]
    assert list(load_state_dict(path, key="model")) == ["v"]


def test_single_wrapped_state_dict_is_found_without_key(tmp_path):
    sd = load_state_dict(_nested_file(tmp_path, _dict({"model": _dict({"w": _w()}), "epoch": 1})))
    assert list(sd) == ["w"]
    ambiguous = _nested_file(tmp_path, _dict({"model": _dict({"w": _w()}), "ema": _dict({"v": _w()})}), "2.pth")
    with pytest.raises(ValueError, match=r"several candidates \['model', 'ema'\].*key="):
        load_state_dict(ambiguous)
    assert list(load_state_dict(ambiguous, key="ema")) == ["v"]


def test_non_tensor_entry_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"nested\.pth: the top-level object .* entry 'n' is a int 5, not a tensor"):
        load_state_dict(_nested_file(tmp_path, _dict({"w": _w(), "n": 5})))


# ---------------------------------------------------------------------------------------- bad files


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=r"noise\.pth: unrecognized checkpoint format"):
        load_state_dict(path)


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "arrays.npz"
    np.savez(path, a=np.zeros(3))
    with pytest.raises(ValueError, match=r"arrays\.npz: zip archive has no '<archive>/data\.pkl'.*'a\.npy'"):
        load_state_dict(path)


def test_truncated_pickle(tmp_path):
    body = _pickle(_dict({"w": _w()}))[:-20]
    with pytest.raises(ValueError, match=r"cut\.pth \(ckpt/data\.pkl\): not a valid state-dict pickle"):
        load_state_dict(_write_zip(tmp_path / "cut.pth", body, {"0": b"\0" * 8}))
