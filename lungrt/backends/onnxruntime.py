"""ONNX Runtime runner: any precision variant file, on the CPU (or CUDA with onnxruntime-gpu)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lungrt.core.errors import LungrtError, one_line
from lungrt.backends.base import Runner, info_from_metadata
from lungrt.backends.integrity import load_verified_onnx


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime session on the CPU (or CUDA when onnxruntime-gpu provides it)."""

    backend = "onnxruntime"

    def __init__(self, onnx_path: str | Path, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        onnx_path = Path(onnx_path)
        checked = load_verified_onnx(onnx_path)
        meta, self.content_hash = checked.meta, checked.content_hash
        self.info = info_from_metadata(meta, str(onnx_path))
        self.weights_id = meta.get("lungrt.weights_hash")
        self.spec = self.info.spec
        self.precision = meta.get("lungrt.export.precision", "fp32")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if meta.get("lungrt.int8_float") == "fp16":
            # the TensorRT INT8 graph (FP16 Q/DQ scales): ORT 1.32's graph optimizer breaks it
            # (mask agreement 0.79 against 0.999 unoptimized), so it runs exactly as written
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.log_severity_level = 3  # errors only: its warnings (unused initializers...) are not the user's to act on
        # no busy-waiting between runs: infer's decode/write threads need those cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise LungrtError("onnxruntime: CUDAExecutionProvider is not available (install onnxruntime-gpu)")
            providers = [
                ("CUDAExecutionProvider", {"device_id": int(device.split(":")[1]) if ":" in device else 0}),
                "CPUExecutionProvider",
            ]
        else:
            providers = ["CPUExecutionProvider"]
        self.device, self.path = device, onnx_path
        self.sleeps_when_idle = device == "cpu"
        try:
            self.session = ort.InferenceSession(checked.data, sess_options=opts, providers=providers)
        except Exception as e:
            raise LungrtError(f"{onnx_path}: ONNX Runtime cannot load it ({one_line(e)})") from None
        self.input_name = self.session.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return np.asarray(self.session.run(None, {self.input_name: x})[0], dtype=np.float32)

    def close(self) -> None:
        self.session = None
