"""TensorRT runner in the shared runner interface, for both flavours (standard TensorRT and
TensorRT-RTX share the runtime API; the plan's metadata says which module opens it).

Torch CUDA tensors are the I/O buffers (no pycuda). Tensor dtypes and the output shape come from
the engine, never assumed; every binding call's result is checked; execute_async_v3 runs on a
non-default stream. With cuda_graph=True the enqueue for a fixed batch is captured once and
replayed, and the graph is kept only after a capture that succeeded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from lungrt.core.modelinfo import ModelInfo
from lungrt.backends.tensorrt import (
    FLAVOURS,
    check_plan_usable,
    gpu_environment,
    import_flavour,
    read_plan_metadata,
)
from lungrt.core.errors import LungrtError
from lungrt.backends.base import INPUT_NAME, OUTPUT_NAME, Runner

log = logging.getLogger(__name__)

# Every attribute of the TensorRT Python API this module and the builder touch; tests check each
# one exists on the installed classes, so a renamed call fails in CI, not on a user's GPU.
RUNTIME_API = {
    "Logger": ["WARNING"],
    "Runtime": ["deserialize_cuda_engine"],
    "ICudaEngine": [
        "create_execution_context",
        "get_tensor_profile_shape",
        "get_tensor_dtype",
        "num_io_tensors",
        "get_tensor_name",
    ],
    "IExecutionContext": ["set_input_shape", "set_tensor_address", "get_tensor_shape", "execute_async_v3"],
    "DataType": ["FLOAT", "HALF", "INT8", "INT32", "BOOL"],
    "MemoryPoolType": ["WORKSPACE"],
}


def torch_dtype(trt, dtype):
    import torch

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT8: torch.int8,
        trt.DataType.INT32: torch.int32,
        trt.DataType.BOOL: torch.bool,
    }
    if dtype not in table:
        raise LungrtError(f"TensorRT runner: engine tensor type {dtype} is not supported")
    return table[dtype]


class TensorRTRunner(Runner):
    backend = "tensorrt"

    def __init__(self, plan: str | Path, cuda_graph: bool = False):
        plan = Path(plan)
        meta = read_plan_metadata(plan)  # checked by content once
        flavour = FLAVOURS.get(meta.get("flavour", "tensorrt"))
        if flavour is None:
            raise LungrtError(f"{plan}: unknown TensorRT flavour in its metadata")
        trt = import_flavour(flavour)
        gpu = gpu_environment()
        if gpu is None:
            raise LungrtError(
                f"{plan}: running a {flavour.name} engine needs an NVIDIA GPU; none is visible "
                "(build works without one, running does not)"
            )
        import torch

        check_plan_usable(plan, trt.__version__, gpu, meta)
        self.backend = flavour.name
        self.info = ModelInfo.from_dict(meta["model"], source=str(plan))
        self.spec, self.precision, self.device, self.path = self.info.spec, meta["precision"], "cuda:0", plan
        self.content_hash, self.weights_id = meta["plan_hash"], meta.get("weights_hash")
        self._trt, self._torch = trt, torch
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise LungrtError(f"{plan}: {flavour.name} could not deserialize the plan (see the log above)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise LungrtError(f"{plan}: could not create an execution context (GPU memory?)")
        self.stream = torch.cuda.Stream()
        lo, _, hi = self.engine.get_tensor_profile_shape(INPUT_NAME, 0)
        self.batch_range = (lo[0], hi[0])
        self.in_dtype = torch_dtype(trt, self.engine.get_tensor_dtype(INPUT_NAME))
        self.out_dtype = torch_dtype(trt, self.engine.get_tensor_dtype(OUTPUT_NAME))
        self.cuda_graph = cuda_graph
        self._graph = None
        self._static: dict = {}

    def _buffers(self, batch: int):
        torch = self._torch
        if self._static.get("batch") != batch:
            shape = (batch, 1, self.spec.size, self.spec.size)
            if not self.context.set_input_shape(INPUT_NAME, shape):
                raise LungrtError(f"{self.path}: the engine refused input shape {shape}")
            out_shape = tuple(self.context.get_tensor_shape(OUTPUT_NAME))
            if any(d < 0 for d in out_shape):
                raise LungrtError(f"{self.path}: output shape {out_shape} is not fully known for input {shape}")
            x = torch.empty(shape, dtype=self.in_dtype, device="cuda")
            y = torch.empty(out_shape, dtype=self.out_dtype, device="cuda")
            for name, t in ((INPUT_NAME, x), (OUTPUT_NAME, y)):
                if not self.context.set_tensor_address(name, t.data_ptr()):
                    raise LungrtError(f"{self.path}: could not bind tensor {name!r}")
            self._static = {"batch": batch, "in": x, "out": y}
            self._graph = None
        return self._static["in"], self._static["out"]

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise LungrtError("TensorRT execute_async_v3 failed")

    def _run_graph(self) -> None:
        torch = self._torch
        if self._graph is None:
            self._enqueue()  # one plain run before capture, as TensorRT requires
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=self.stream):
                    self._enqueue()
            except Exception as e:  # some engines cannot be captured: run them plainly
                log.warning("CUDA graph capture failed (%s); running without it", str(e).splitlines()[0])
                self.cuda_graph = False
                return
            self._graph = graph
        self._graph.replay()

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
                self._run_graph()
            if not self.cuda_graph:
                self._enqueue()
            out = y_out.to("cpu", non_blocking=True)
        self.stream.synchronize()
        return out.float().numpy()

    def close(self) -> None:
        self._graph = None
        self.context = None
        self.engine = None
