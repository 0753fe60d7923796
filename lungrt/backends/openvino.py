"""OpenVINO runner: lungrt's ONNX variants on Intel/AMD CPUs, the engine a CPU deployment picks.

FP32 runs with `INFERENCE_PRECISION_HINT=f32` (OpenVINO's CPU plugin would otherwise pick bf16 on
CPUs that have it, silently). BF16 is a precision of its own (`precision="bf16"`, CPUs with native
bf16 only) and is parity-gated like any variant. INT8 runs from an OpenVINO IR (.xml + .bin) that
NNCF quantized on the OpenVINO model itself (`save_sealed_ir`: lungrt's metadata and content hash in
its rt_info). Threads sleep between calls (no busy-waiting), so infer's decode/write helpers can run
at idle priority beside it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lungrt.backends.base import Runner, info_from_metadata
from lungrt.backends.integrity import load_verified
from lungrt.export.openvino_ir import openvino_core, save_sealed_ir  # noqa: F401  (re-exported)
from lungrt.core.errors import BackendUnavailable, LungrtError, one_line

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}


def native_bf16() -> bool:
    """The CPU computes bf16 natively (AVX-512 BF16 / AMX) and oneDNN is not capped below it."""
    from lungrt.core.hardware import cpu_identity

    cap = (cpu_identity().get("isa_cap") or "").upper()
    if cap and not any(k in cap for k in ("BF16", "AMX", "AVX10")):
        return False
    try:
        _, core = openvino_core()
        return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:
        return False


class OpenVinoRunner(Runner):
    backend = "openvino"

    def __init__(self, path: str | Path, precision: str = "fp32", threads: int | None = None):
        """`path`: an ONNX variant, or an OpenVINO IR (.xml) lungrt wrote."""
        ov, core = openvino_core()
        path = Path(path)
        if precision not in PRECISION_HINTS:
            raise LungrtError(f"openvino: precision {precision!r} not supported ({', '.join(PRECISION_HINTS)})")
        if precision == "bf16" and not native_bf16():
            raise BackendUnavailable("openvino bf16: this CPU has no native bf16 (AVX-512 BF16 / AMX)")
        checked = load_verified(path)
        meta, self.content_hash = checked.meta, checked.content_hash
        self.info = info_from_metadata(meta, str(path))
        self.spec, self.path, self.device = self.info.spec, path, "cpu"
        self.weights_id = meta.get("lungrt.weights_hash")
        variant = meta.get("lungrt.export.precision", "fp32")
        # the graph's own precision (fp16/int8 variants) or, for the FP32 graph, OpenVINO's bf16 mode
        self.precision = precision if variant == "fp32" else variant
        config = {
            "INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision],
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": str(threads or os.cpu_count() or 1),
        }
        try:
            self.compiled = core.compile_model(core.read_model(checked.data, checked.weights), "CPU", config)
        except Exception as e:
            raise LungrtError(f"{path}: OpenVINO cannot compile it ({one_line(e)})") from None
        self.request = self.compiled.create_infer_request()
        self.sleeps_when_idle = True

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        out = self.request.infer({0: x})
        return np.asarray(out[self.compiled.output(0)], dtype=np.float32)

    def close(self) -> None:
        self.request = None
        self.compiled = None
