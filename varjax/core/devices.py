"""What each accelerator offers: memory (HBM) and peak dense bf16 FLOP/s per device, by ``device_kind``.

Used to say whether a compiled step fits (``varjax compile``) and to turn a step's FLOPs into MFU (the trainer's
``mfu`` metric, the benchmarks). A kind not listed has no figure: MFU is then reported only when
``config.peak_tflops`` gives the peak.
"""

from __future__ import annotations

HBM_GIB = {  # per device (v4/v5p: one megacore device per chip)
    "TPU v4": 32,
    "TPU v5 lite": 16,
    "TPU v5e": 16,
    "TPU v5": 95,
    "TPU v5p": 95,
    "TPU v6 lite": 32,
    "TPU v6e": 32,
    "NVIDIA H100": 80,
    "NVIDIA H200": 141,
    "NVIDIA A100": 80,
}

PEAK_TFLOPS = {  # dense bf16 per device
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5": 459.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0,
}


def _lookup(table: dict, device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for prefix, value in sorted(table.items(), key=lambda kv: -len(kv[0])):  # longest prefix first
        if kind.startswith(prefix):
            return value
    return None


def hbm_bytes(device) -> int | None:
    gib = _lookup(HBM_GIB, device)
    return None if gib is None else int(gib * 2**30)


def peak_flops(device, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: ``override_tflops`` when given (> 0), else the table's figure, else None."""
    tflops = override_tflops if override_tflops else _lookup(PEAK_TFLOPS, device)
    return None if tflops is None else tflops * 1e12
