"""PyTorch runner: eager fp32, fp16/bf16 autocast, channels_last, torch.compile, CUDA graphs."""

from __future__ import annotations

import numpy as np
import torch

from lungrt.models.checkpoint import LoadedModel, weights_hash
from lungrt.core.errors import LungrtError
from lungrt.backends.base import Runner
from lungrt.models import ProbabilityModel


class TorchRunner(Runner):
    """PyTorch on CPU or CUDA: eager fp32, or fp16/bf16 autocast, with the fast paths users
    without TensorRT want: channels_last, torch.compile, and CUDA graphs for a fixed batch."""

    backend = "torch"

    def __init__(
        self,
        loaded: LoadedModel,
        device: str = "cpu",
        precision: str = "fp32",
        channels_last: bool = False,
        compile: bool = False,
        cuda_graph: bool = False,
    ):
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
        self.options = [
            o for o, on in (("channels_last", channels_last), ("compile", compile), ("cuda_graph", cuda_graph)) if on
        ]

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
