"""The one place that turns names into runners: a shipped name, checkpoint, ONNX file or engine,
plus a backend and precision, become a `Runner`. The runner contract (runners.py) knows no
backend by name; commands, the Python API, bench, build and Ray all choose here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from lungrt.models.checkpoint import LoadedModel
from lungrt.core.errors import BackendUnavailable, LungrtError
from lungrt.backends.base import Runner
from lungrt.backends.onnxruntime import OnnxRuntimeRunner
from lungrt.backends.pytorch import TorchRunner

log_ = logging.getLogger(__name__)
ENGINE_SUFFIXES = (".plan", ".engine")
# bench's PyTorch configurations: name -> TorchRunner options
TORCH_FAST_PATHS = {
    "torch": {},
    "torch-cl": {"channels_last": True},
    "torch-compile": {"channels_last": True, "compile": True},
    "torch-cudagraph": {"channels_last": True, "cuda_graph": True},
}


def open_engine(plan: str | Path) -> Runner:
    from lungrt.backends.tensorrt.runner import TensorRTRunner  # imported lazily: needs a TensorRT flavour

    return TensorRTRunner(plan)


def open_artifact(path: str | Path, device: str = "cpu") -> Runner:
    """An ONNX variant (ONNX Runtime) or a TensorRT engine, by its suffix."""
    path = Path(path)
    if path.suffix in ENGINE_SUFFIXES:
        return open_engine(path)
    if path.suffix == ".onnx":
        return OnnxRuntimeRunner(path, device=device)
    raise LungrtError(f"{path}: not an ONNX file or TensorRT engine (.onnx, .plan, .engine)")


def open_runner(model: str | None = None, onnx: str | Path | None = None, engine: str | Path | None = None,
                backend: str = "auto", device: str = "cpu", precision: str = "fp32",
                arch: str | None = None, width: int = 16) -> Runner:
    """The runner a command asked for: a checkpoint/name on torch, an ONNX file on ONNX Runtime,
    or a TensorRT plan."""
    if engine is not None:
        return open_engine(engine)
    if onnx is not None:
        if backend == "openvino":
            return open_openvino(onnx, precision)
        if backend not in ("auto", "onnxruntime"):
            raise LungrtError(f"--onnx runs on onnxruntime or openvino, not {backend!r}")
        return OnnxRuntimeRunner(onnx, device=device)
    from lungrt.models.checkpoint import resolve_model

    loaded = resolve_model(model or "unet", arch=arch, width=width)
    if backend in ("auto", "torch"):
        return TorchRunner(loaded, device=device, precision=precision)
    raise LungrtError(f"backend {backend!r} needs an exported model: pass --onnx FILE (see `lungrt export`)")


def select_runner(model: str, arch: str | None = None, onnx: str | Path | None = None, engine: str | Path | None = None,
                  backend: str = "auto", precision: str = "fp32", device: str = "auto", log=log_.info) -> Runner:
    """The runner for infer/demo: an explicit ONNX file or plan, else the model on the best
    backend here (TensorRT when usable, CUDA PyTorch on a GPU, else ONNX Runtime on the CPU)."""
    from lungrt.models.checkpoint import resolve_model
    from lungrt.export.variants import make_variant

    if engine is not None or onnx is not None:
        return open_runner(onnx=onnx, engine=engine, backend=backend, precision=precision)
    if backend in ("tensorrt", "tensorrt-rtx"):
        raise LungrtError(f"backend {backend}: build an engine first with `lungrt build --backend {backend}`, "
                          "then pass --engine PLAN")
    loaded = resolve_model(model, arch=arch)
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if backend == "auto" and not cuda and precision == "fp32":
        chosen = open_recorded_cpu_choice(loaded, log)
        if chosen is not None:
            return chosen
    if backend == "torch" or (backend == "auto" and cuda):
        if precision == "int8" or (precision == "fp16" and not cuda):
            raise LungrtError(f"backend torch runs {precision} only {'on ONNX Runtime or TensorRT' if precision == 'int8' else 'on a CUDA GPU'}; "
                              f"use --backend onnxruntime --precision {precision}, or --precision fp32")
        return TorchRunner(loaded, device="cuda" if cuda else "cpu", precision=precision)
    if backend in ("auto", "onnxruntime", "openvino"):
        from lungrt.core.cache import cache_root

        if precision == "int8":  # made here it would be calibrated on phantoms and never gated
            raise LungrtError(f"INT8 needs a calibration set and a parity gate: `lungrt build --model {model} --backend cpu "
                              "--precision auto --data DIR --calib DIR` (infer then uses what passed), or `lungrt build "
                              "--backend onnxruntime|openvino --precision int8 --data DIR --calib DIR` and --onnx FILE")

        root = cache_root()
        graph = "fp32" if precision == "bf16" else precision  # OpenVINO's bf16 runs the FP32 graph
        if precision == "bf16" and backend != "openvino":
            raise LungrtError("precision bf16 is OpenVINO's (or PyTorch's on a GPU); use --backend openvino")
        path = make_variant(loaded, graph, folder=root / "variants", cache_dir=root / "calibration", log=log,
                            target="openvino" if backend == "openvino" else "onnxruntime").path
        return open_openvino(path, precision) if backend == "openvino" else OnnxRuntimeRunner(path)
    raise LungrtError(f"unknown backend {backend!r}; use auto, torch, onnxruntime, openvino or tensorrt")


def cpu_choice_file(loaded: LoadedModel, weights: str | None = None) -> Path:
    """Per weights (`weights`: their hash, if already known) and per CPU: servers with other CPUs
    sharing one cache keep their own choices."""
    from lungrt.core.cache import cache_root
    from lungrt.core.hardware import cpu_tag
    from lungrt.models.checkpoint import weights_hash

    return cache_root() / "cpu-choice" / f"{loaded.info.name}-{weights or weights_hash(loaded.model)}-cpu{cpu_tag()}.json"


def record_cpu_choice(loaded: LoadedModel, choice: dict) -> Path:
    """Remember `lungrt build --backend cpu --precision auto`'s choice (backend, precision, the
    gated variant file) for these weights on this CPU; infer/demo/the API pick it up."""
    from lungrt.core.hardware import cpu_identity
    from lungrt.data.io import atomic_write_bytes

    path = cpu_choice_file(loaded)
    path.parent.mkdir(parents=True, exist_ok=True)
    choice = {**choice, "path": str(Path(choice["path"]).resolve()), "hardware": cpu_identity()}  # usable from any folder
    atomic_write_bytes(path, json.dumps(choice, indent=2).encode())
    return path


def recorded_cpu_choice(loaded: LoadedModel, weights: str | None = None, log=log_.info) -> dict | None:
    """The recorded CPU choice for these weights, if it was made on this very CPU (model, speed
    flags, cores): backend, precision, variant file, its speed and gate result when recorded."""
    from lungrt.core.hardware import cpu_identity

    path = cpu_choice_file(loaded, weights)
    try:
        choice = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if choice.get("hardware") != cpu_identity():
        log(f"ignoring {path.name}: chosen on another CPU; rerun `lungrt build --backend cpu --precision auto`")
        return None
    return choice


def open_recorded_cpu_choice(loaded: LoadedModel, log=log_.info) -> Runner | None:
    """The runner of the recorded CPU choice (`recorded_cpu_choice`), if its variant file still
    holds these weights; else None."""
    from lungrt.models.checkpoint import weights_hash

    weights = weights_hash(loaded.model)
    path = cpu_choice_file(loaded, weights)
    choice = recorded_cpu_choice(loaded, weights, log)
    if choice is None:
        return None
    try:
        runner = (open_openvino(choice["path"], choice["precision"]) if choice["backend"] == "openvino"
                  else OnnxRuntimeRunner(choice["path"]))
    except (LungrtError, KeyError) as e:
        log(f"ignoring {path.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return None
    if runner.weights_id != weights:
        runner.close()
        log(f"ignoring {path.name}: its variant file holds other weights")
        return None
    log(f"CPU configuration chosen by `lungrt build --backend cpu --precision auto`: {choice['backend']} {choice['precision']}")
    return runner


def open_openvino(onnx: str | Path, precision: str = "fp32") -> Runner:
    from lungrt.backends.openvino import OpenVinoRunner  # imported lazily: an optional extra

    return OpenVinoRunner(onnx, precision="bf16" if precision == "bf16" else "fp32")


def open_config_runner(loaded: LoadedModel, backend: str, variant: str, device: str, variant_path) -> Runner:
    """bench's configurations: a backend name x precision. `variant_path(v, backend)` gives the file
    that backend runs: the ONNX variant made for it, or the engine. Missing software or hardware:
    BackendUnavailable."""
    if backend in TORCH_FAST_PATHS:
        from lungrt.training.train import bf16_autocast_supported

        if variant == "int8":
            raise BackendUnavailable("no int8 for PyTorch eager")
        if variant == "bf16" and not device.startswith("cuda") and not bf16_autocast_supported():
            raise BackendUnavailable("no native bf16 on this CPU (oneDNN would emulate it, far slower than fp32)")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable("no CUDA device here")
        return TorchRunner(loaded, device=device, precision=variant, **TORCH_FAST_PATHS[backend])
    if backend == "onnxruntime":
        if variant == "bf16":
            raise BackendUnavailable("no bf16 variant for ONNX Runtime (OpenVINO runs bf16)")
        return OnnxRuntimeRunner(variant_path(variant, backend), device=device if device.startswith("cuda") else "cpu")
    if backend == "openvino":
        return open_openvino(variant_path("fp32" if variant == "bf16" else variant, backend), variant)
    if backend in ("tensorrt", "tensorrt-rtx"):
        from lungrt.backends.tensorrt.engine import gpu_environment

        if gpu_environment() is None:
            raise BackendUnavailable("running TensorRT engines needs an NVIDIA GPU; none is visible")
        return open_engine(variant_path(variant, backend))
    raise LungrtError(f"unknown backend {backend!r}")
