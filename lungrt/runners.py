"""One small runner interface for every backend, so evaluation, parity, infer and bench compare
any two of them with the same code.

A runner takes a preprocessed batch (B, 1, S, S) float32, normalised by the model's spec, and
returns lung probabilities (B, 1, S, S) float32. It reports its backend, device and precision,
and is closed (or used as a context manager) when done.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import LoadedModel, ModelInfo, weights_hash
from .errors import LungrtError
from .preprocess import PreprocessSpec

INPUT_NAME, OUTPUT_NAME = "image", "probability"


class Runner(ABC):
    backend: str = "?"
    device: str = "cpu"
    precision: str = "fp32"
    spec: PreprocessSpec
    info: ModelInfo
    # True when the runner's CPU threads sleep (never spin) while waiting: helper threads may then
    # take only the CPU time it leaves idle (see infer). Spinning runners would starve them.
    sleeps_when_idle: bool = False
    weights_id: str | None = None  # hash of the weights it runs: what `infer --resume` compares

    @abstractmethod
    def run(self, batch: np.ndarray) -> np.ndarray:
        """(B, 1, S, S) float32 normalised input -> (B, 1, S, S) float32 probabilities."""

    def close(self) -> None:  # noqa: B027 - optional for runners that hold nothing
        pass

    def describe(self) -> str:
        return f"{self.backend}/{self.device}/{self.precision}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ProbabilityModel(nn.Module):
    """The network plus the sigmoid: what every backend runs and what ONNX exports."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(image))


class TorchRunner(Runner):
    """PyTorch on CPU or CUDA: eager fp32, or fp16/bf16 autocast, with the fast paths users
    without TensorRT want: channels_last, torch.compile, and CUDA graphs for a fixed batch."""

    backend = "torch"

    def __init__(self, loaded: LoadedModel, device: str = "cpu", precision: str = "fp32", channels_last: bool = False,
                 compile: bool = False, cuda_graph: bool = False):
        if precision not in ("fp32", "fp16", "bf16"):
            raise LungrtError(f"torch runner: precision {precision!r} not supported (fp32, fp16, bf16)")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise LungrtError("torch runner: CUDA requested but no CUDA device is available")
        if cuda_graph and not device.startswith("cuda"):
            raise LungrtError("torch runner: CUDA graphs need a CUDA device")
        self.info, self.spec = loaded.info, loaded.spec
        self.device, self.precision = device, precision
        self.weights_id = weights_hash(loaded.model)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = ProbabilityModel(loaded.model).eval().to(device).to(memory_format=self.memory_format)
        self.dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.forward = torch.compile(self.model) if compile else self.model
        self.cuda_graph = cuda_graph
        self._graph = None
        self.options = [o for o, on in (("channels_last", channels_last), ("compile", compile), ("cuda_graph", cuda_graph)) if on]

    def describe(self) -> str:
        return "+".join([super().describe(), *self.options])

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        dev_type = "cuda" if self.device.startswith("cuda") else "cpu"
        with torch.autocast(dev_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.forward(x)

    def _graph_run(self, x: torch.Tensor) -> torch.Tensor:
        """Capture once per batch shape, then replay: removes per-kernel launch overhead."""
        if self._graph is None or self._static_in.shape != x.shape:
            self._static_in = x.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up outside the graph (cuDNN autotune, allocator)
                    self._infer(self._static_in)
            torch.cuda.current_stream().wait_stream(side)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._static_out = self._infer(self._static_in)
        self._static_in.copy_(x)
        self._graph.replay()
        return self._static_out

    @torch.inference_mode()
    def run(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        if self.device.startswith("cuda"):
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.contiguous(memory_format=self.memory_format)
        y = self._graph_run(x) if self.cuda_graph else self._infer(x)
        return y.float().cpu().numpy()


def onnx_metadata(path: str | Path) -> dict:
    """lungrt metadata stored in an ONNX file's metadata_props (without loading the weights)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}


def info_from_metadata(meta: dict, source: str) -> ModelInfo:
    if "lungrt.model" not in meta:
        raise LungrtError(f"{source}: ONNX file has no lungrt metadata (export it with `lungrt export`)")
    return ModelInfo.from_dict(json.loads(meta["lungrt.model"]), source=source)


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime session on the CPU (or CUDA when onnxruntime-gpu provides it)."""

    backend = "onnxruntime"

    def __init__(self, onnx_path: str | Path, device: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        onnx_path = Path(onnx_path)
        if not onnx_path.exists():
            raise LungrtError(f"{onnx_path}: ONNX file does not exist")
        try:
            meta = onnx_metadata(onnx_path)
        except Exception as e:  # protobuf raises its own errors on garbage
            raise LungrtError(f"{onnx_path}: not a readable ONNX file ({type(e).__name__})") from None
        self.info = info_from_metadata(meta, str(onnx_path))
        self.weights_id = meta.get("lungrt.weights_hash")
        self.spec = self.info.spec
        self.precision = meta.get("lungrt.precision", "fp32")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if meta.get("lungrt.int8_float") == "fp16":
            # the TensorRT INT8 graph (FP16 Q/DQ scales): ORT 1.32's graph optimizer breaks it
            # (mask agreement 0.79 against 0.999 unoptimized), so it runs exactly as written
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        # no busy-waiting between runs: infer's decode/write threads need those cores
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise LungrtError("onnxruntime: CUDAExecutionProvider is not available (install onnxruntime-gpu)")
            providers = [("CUDAExecutionProvider", {"device_id": int(device.split(":")[1]) if ":" in device else 0}),
                         "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.device, self.path = device, onnx_path
        self.sleeps_when_idle = device == "cpu"
        try:
            self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers)
        except Exception as e:
            raise LungrtError(f"{onnx_path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]})") from None
        self.input_name = self.session.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return np.asarray(self.session.run(None, {self.input_name: x})[0], dtype=np.float32)

    def close(self) -> None:
        self.session = None
