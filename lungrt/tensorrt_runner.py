"""TensorRT runner in the shared runner interface.

Torch CUDA tensors are the I/O buffers (no pycuda): input shapes are set per batch inside the
engine's optimization profile, addresses bound with set_tensor_address, and execute_async_v3 runs
on a non-default stream. With cuda_graph=True the enqueue for a fixed batch is captured once and
replayed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .checkpoint import ModelInfo
from .engine import check_plan_usable, PolygraphyBuilder
from .errors import LungrtError
from .runners import INPUT_NAME, OUTPUT_NAME, Runner


class TensorRTRunner(Runner):
    backend = "tensorrt"

    def __init__(self, plan: str | Path, cuda_graph: bool = False):
        try:
            import tensorrt as trt
            import torch
        except ImportError as e:
            raise LungrtError(f"TensorRT runner: {e}; install with pip install 'lungrt[trt]'") from None
        plan = Path(plan)
        meta = check_plan_usable(plan, PolygraphyBuilder().environment())
        self.info = ModelInfo.from_dict(meta["model"], source=str(plan))
        self.spec, self.precision, self.device, self.path = self.info.spec, meta["precision"], "cuda:0", plan
        self._torch = torch
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise LungrtError(f"{plan}: TensorRT could not deserialize the plan (see the log above)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        lo, _, hi = self.engine.get_tensor_profile_shape(INPUT_NAME, 0)
        self.batch_range = (lo[0], hi[0])
        self.cuda_graph = cuda_graph
        self._graph = None
        self._static: dict = {}

    def _buffers(self, batch: int):
        torch = self._torch
        if self._static.get("batch") != batch:
            shape = (batch, 1, self.spec.size, self.spec.size)
            self._static = {"batch": batch, "in": torch.empty(shape, device="cuda"), "out": torch.empty(shape, device="cuda")}
            self.context.set_input_shape(INPUT_NAME, shape)
            self.context.set_tensor_address(INPUT_NAME, self._static["in"].data_ptr())
            self.context.set_tensor_address(OUTPUT_NAME, self._static["out"].data_ptr())
            self._graph = None
        return self._static["in"], self._static["out"]

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise LungrtError("TensorRT execute_async_v3 failed")

    def run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        n = len(batch)
        if not self.batch_range[0] <= n <= self.batch_range[1]:
            raise LungrtError(f"batch {n} is outside the engine's profile {self.batch_range}; rebuild with --batch")
        x_in, y_out = self._buffers(n)
        host = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).pin_memory()
        with torch.cuda.stream(self.stream):
            x_in.copy_(host, non_blocking=True)
            if self.cuda_graph:
                if self._graph is None:
                    self._enqueue()  # one plain run before capture, as TensorRT requires
                    self._graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(self._graph, stream=self.stream):
                        self._enqueue()
                self._graph.replay()
            else:
                self._enqueue()
            out = y_out.to("cpu", non_blocking=True)
        self.stream.synchronize()
        return out.numpy()

    def close(self) -> None:
        self._graph = None
        self.context = None
        self.engine = None
