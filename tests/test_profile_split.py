"""bench/profile_train.py: wall time shared among concurrently running ops, and a real profiled step."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import profile_train as P  # noqa: E402


def _x(name, ts, dur):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur}


def test_concurrent_ops_share_the_wall_clock():
    # a: 0-10, b: 5-15 (overlap 5-10 shared), gap 15-20, c: 20-30
    share, span, idle = P.wall_shares([(0, 10, "a"), (5, 15, "b"), (20, 30, "c")])
    assert share == {"a": 7.5, "b": 7.5, "c": 10}
    assert span == 30 and idle == 5
    assert sum(share.values()) + idle == span


def test_async_dot_ends_at_its_end_event_in_order():
    ops = {"dot.1": "fc1/transpose", "fusion.2": ""}
    events = [_x("dot.1", 0, 1), _x("fusion.2", 1, 3), _x("end: dot.1", 9, 0),
              _x("dot.1", 20, 1), _x("end: dot.1", 26, 0), _x("ThunkExecutor::Execute", 0, 30)]
    assert P.op_intervals(events, ops) == [(0, 9, "dot.1"), (1, 4, "fusion.2"), (20, 26, "dot.1")]


@pytest.mark.parametrize(("name", "op", "want"), [
    ("ynn_fusion.3", "jit(step_fn)/while/body/blocks/ffn/fc1/dot_general", "weight products"),
    ("dot.152", "transpose(jvp(VAR))/while/body/blocks/attn/mat_qkv/transpose", "weight products"),
    ("ynn_fusion.5", "while/body/blocks/attn/reduce_sum", "attention"),
    ("multiply_fusion", "while/body/blocks/attn/proj/add", "other"),
    ("wrapped_broadcast.2", "VAR.run_blocks/broadcast_in_dim", "scan buffers"),
    ("bitcast_dynamic-update-slice_fusion.6", "while/body/dynamic_update_slice", "scan buffers"),
    ("add_fusion", "adam/add", "other"),
])
def test_category(name, op, want):
    assert P.category(name, op) == want


def test_profiled_step_splits_into_categories(tmp_path):
    res = P.main(["--depth", "2", "--width", "64", "--heads", "2", "--patch-nums", "1,2,3", "--vocab", "64",
                  "--cvae", "8", "--num-classes", "10", "--batch-size", "8", "--dtype", "float32",
                  "--scan-layers", "--remat", "dots", "--json", str(tmp_path / "p.json"),
                  "--png", str(tmp_path / "p.png")])
    wall = res["wall_s"]
    assert wall["weight products"] > 0 and wall["attention"] > 0
    assert sum(wall.values()) + res["idle_s"] == pytest.approx(res["profiled_step_s"], rel=1e-6)
    assert res["analytic_gflop"]["weight products"] > res["analytic_gflop"]["attention"] > 0
    assert (tmp_path / "p.png").stat().st_size > 1000
