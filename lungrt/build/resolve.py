"""The one place that turns what a user named into a runner: a shipped name, checkpoint, run
folder, ONNX file or TensorRT plan, plus a backend, precision and device, become a `Runner`, or a
one-line refusal when that combination cannot be honoured. Nothing is substituted silently: the
opened runner's identity (backend, precision, device) is checked against what was asked.
Commands, the Python API, parity, bench, build, demo and Ray all open runners here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from lungrt.core.defaults import DEFAULT_MODEL
from lungrt.models.checkpoint import LoadedModel
from lungrt.core.errors import BackendUnavailable, LungrtError
from lungrt.backends.base import Runner
from lungrt.backends.integrity import IR_SUFFIX
from lungrt.backends.onnxruntime import OnnxRuntimeRunner
from lungrt.backends.pytorch import TorchRunner

log_ = logging.getLogger(__name__)
ENGINE_SUFFIXES = (".plan", ".engine")
BACKENDS = ("auto", "torch", "onnxruntime", "openvino", "tensorrt", "tensorrt-rtx")
RUNNER_PRECISIONS = ("fp32", "fp16", "bf16", "int8")
TORCH_OPTIONS = ("channels_last", "compile", "cuda_graph")
# bench's PyTorch configurations: name -> TorchRunner options
TORCH_FAST_PATHS = {
    "torch": (),
    "torch-cl": ("channels_last",),
    "torch-compile": ("channels_last", "compile"),
    "torch-cudagraph": ("channels_last", "cuda_graph"),
}


def open_runner(
    source: str | Path | LoadedModel | None = None,
    *,
    backend: str = "auto",
    precision: str | None = None,
    device: str = "auto",
    arch: str | None = None,
    onnx: str | Path | None = None,
    engine: str | Path | None = None,
    options: Sequence[str] = (),
    convention: str | None = None,
    second_opinion: bool | str | Path = False,
    log=log_.info,
) -> Runner:
    """The runner for `source` (or `onnx` / `engine`, as the CLI names them) on `backend` in
    `precision` (None: the file's own; for weights, the recorded CPU choice or FP32) on `device`.

    A file runs as it is: an ONNX file on ONNX Runtime or OpenVINO (bf16: OpenVINO's mode on an
    FP32 graph), an OpenVINO IR (.xml, OpenVINO's INT8) on OpenVINO, a plan on its TensorRT flavour. Weights run on
    PyTorch, or on the ONNX variant
    made for the backend asked. `convention` (None: any) picks a shipped name's weights for that mask
    convention and refuses a file of the other. `second_opinion`: a `SecondOpinionRunner` with the whole-lung
    model QC's `whole_lung_cover` bound was fitted with: True for the shipped whole-lung weights of the same
    architecture, on the same backend and device; or that model's checkpoint, ONNX file or plan. Whatever cannot
    be honoured is refused (LungrtError; missing software or hardware: BackendUnavailable), never replaced by
    something else."""
    if convention is not None:
        from lungrt.core.spec import check_convention

        try:
            check_convention(convention)
        except ValueError as e:
            raise LungrtError(str(e)) from None
    if backend not in BACKENDS:
        raise LungrtError(f"unknown backend {backend!r}; use {', '.join(BACKENDS)}")
    if precision is not None and precision not in RUNNER_PRECISIONS:
        raise LungrtError(f"unknown precision {precision!r}; use {', '.join(RUNNER_PRECISIONS)}")
    if onnx is not None and engine is not None:
        raise LungrtError("give an ONNX file or a TensorRT plan, not both")
    unknown = [o for o in options if o not in TORCH_OPTIONS]
    if unknown:
        raise LungrtError(f"unknown runner option(s) {', '.join(unknown)}; use {', '.join(TORCH_OPTIONS)}")
    artifact = engine if engine is not None else onnx
    if (
        artifact is None
        and isinstance(source, (str, Path))
        and str(source).endswith((*ENGINE_SUFFIXES, ".onnx", IR_SUFFIX))
    ):
        artifact = source
    if options and (artifact is not None or backend not in ("auto", "torch")):
        raise LungrtError(f"runner options {', '.join(options)} are PyTorch's; they need weights on --backend torch")
    if artifact is None:
        runner = _open_weights(source, backend, precision, device, arch, tuple(options), log, convention)
    elif engine is not None or str(artifact).endswith(ENGINE_SUFFIXES):
        runner = _open_engine(Path(artifact), backend, device)
    else:
        runner = _open_onnx(Path(artifact), backend, precision, device)
    named = str(artifact if artifact is not None else source)
    runner = _honoured(runner, backend, precision, device, named, convention)
    return with_second_opinion(runner, second_opinion, log) if second_opinion else runner


def with_second_opinion(runner: Runner, reference: bool | str | Path, log=log_.info) -> Runner:
    """`runner` with its second opinion (`open_runner`'s `second_opinion`) opened on the same backend and device;
    refused, and `runner` closed, when that cannot be honoured or QC holds no bound fitted with those weights."""
    from lungrt.backends.second_opinion import SecondOpinionRunner
    from lungrt.core.spec import WHOLE_LUNG

    if reference is True and runner.backend in ("tensorrt", "tensorrt-rtx"):
        runner.close()
        from lungrt.models.checkpoint import shipped_checkpoint

        weights = shipped_checkpoint(runner.info.name, WHOLE_LUNG) or f"{runner.info.name}.{WHOLE_LUNG}.safetensors"
        raise LungrtError(
            f"a second opinion on {runner.backend} runs the {WHOLE_LUNG} model's own plan: build it (`lungrt build "
            f"--model {weights} --backend {runner.backend}`) and name that plan as the second opinion"
        )
    source = runner.info.name if reference is True else reference
    other = None
    try:
        other = open_runner(source, backend=runner.backend, device=runner.device, convention=WHOLE_LUNG, log=log)
        return SecondOpinionRunner(runner, other)
    except BaseException:  # refused: close what was opened
        runner.close()
        if other is not None:
            other.close()
        raise


def _honoured(
    runner: Runner, backend: str, precision: str | None, device: str, named: str, convention: str | None = None
) -> Runner:
    """`runner` if it is what was asked, else closed and refused in one line."""
    wrong = []
    if convention is not None and runner.spec.convention != convention:
        wrong.append(f"mask convention {runner.spec.convention}, not {convention}")
    if backend != "auto" and runner.backend != backend:
        wrong.append(f"backend {runner.backend}, not {backend}")
    if precision is not None and runner.precision != precision:
        wrong.append(f"precision {runner.precision}, not {precision}")
    if device != "auto" and runner.device.split(":")[0] != device.split(":")[0]:
        wrong.append(f"device {runner.device}, not {device}")
    if wrong:
        runner.close()
        raise LungrtError(
            f"{named}: would run as {runner.describe()} ({'; '.join(wrong)}); refusing rather than "
            "running something other than what was asked"
        )
    return runner


def _open_engine(plan: Path, backend: str, device: str) -> Runner:
    if backend not in ("auto", "tensorrt", "tensorrt-rtx"):
        raise LungrtError(
            f"{plan}: a TensorRT plan runs on its TensorRT flavour, not {backend}; "
            "for the CPU engines pass the ONNX file it was built from"
        )
    if device not in ("auto",) and not device.startswith("cuda"):
        raise LungrtError(f"{plan}: a TensorRT plan runs on an NVIDIA GPU, not on {device}")
    from lungrt.backends.tensorrt import gpu_environment, read_plan_metadata

    if gpu_environment() is None:
        read_plan_metadata(plan)  # a missing, corrupted or sidecar-less plan says so before "no GPU"
        raise BackendUnavailable(
            f"{plan}: running a TensorRT engine needs an NVIDIA GPU; none is visible "
            "(building works without one, running does not)"
        )
    from lungrt.backends.tensorrt.runner import TensorRTRunner  # imported lazily: needs a TensorRT flavour

    return TensorRTRunner(plan)


def _open_onnx(path: Path, backend: str, precision: str | None, device: str) -> Runner:
    if path.suffix == IR_SUFFIX and backend not in ("auto", "openvino"):
        raise LungrtError(f"{path}: an OpenVINO IR runs on openvino, not {backend}")
    if backend in ("tensorrt", "tensorrt-rtx"):
        raise LungrtError(
            f"{path}: compile it first (`lungrt build --onnx {path} --backend {backend}`), then pass the plan"
        )
    if backend == "torch":
        raise LungrtError(
            f"{path}: an ONNX file runs on onnxruntime or openvino; PyTorch runs the checkpoint (--model)"
        )
    if backend == "openvino" or path.suffix == IR_SUFFIX:
        if device not in ("auto", "cpu"):
            raise LungrtError(f"{path}: lungrt runs OpenVINO on the CPU only, not on {device}")
        return _openvino(path, precision or "fp32")
    if precision == "bf16":
        raise LungrtError(f"{path}: bf16 is OpenVINO's mode on an FP32 graph; use --backend openvino")
    return OnnxRuntimeRunner(path, device="cpu" if device == "auto" else device)


def _openvino(path: Path, precision: str) -> Runner:
    from lungrt.backends.openvino import OpenVinoRunner  # imported lazily: an optional extra

    return OpenVinoRunner(path, precision="bf16" if precision == "bf16" else "fp32")


def _open_weights(
    source,
    backend: str,
    precision: str | None,
    device: str,
    arch: str | None,
    options: tuple,
    log,
    convention: str | None = None,
) -> Runner:
    from lungrt.models.checkpoint import resolve_model

    if backend in ("tensorrt", "tensorrt-rtx"):
        raise LungrtError(
            f"backend {backend}: build an engine first with `lungrt build --backend {backend}`, "
            "then pass the plan (--engine PLAN)"
        )
    loaded = (
        source
        if isinstance(source, LoadedModel)
        else resolve_model(source or DEFAULT_MODEL, arch=arch, convention=convention)
    )
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise BackendUnavailable(f"device {device}: no CUDA device here")
    if backend == "auto" and not cuda and precision is None:
        chosen = open_recorded_cpu_choice(loaded, log)
        if chosen is not None:
            return chosen
    precision = precision or "fp32"
    if backend == "torch" or (backend == "auto" and cuda):
        return _torch(loaded, "cuda" if cuda else "cpu", precision, options)
    if precision == "int8":  # made here it would be calibrated on phantoms and never gated
        raise LungrtError(
            f"INT8 needs a calibration set and a parity gate: `lungrt build --model {loaded.info.name} "
            "--backend cpu --precision auto --data DIR --calib DIR` (infer then uses what passed), or "
            "`lungrt build --backend onnxruntime|openvino --precision int8 --data DIR --calib DIR` and --onnx FILE"
        )
    if precision == "bf16" and backend != "openvino":
        raise LungrtError("precision bf16 is OpenVINO's (or PyTorch's: --backend torch); use --backend openvino")
    if cuda and backend == "openvino":
        raise LungrtError("lungrt runs OpenVINO on the CPU only")
    from lungrt.core.cache import cache_root
    from lungrt.build.variants import make_variant

    root = cache_root()
    target = "openvino" if backend == "openvino" else "onnxruntime"
    path = make_variant(
        loaded,
        "fp32" if precision == "bf16" else precision,
        folder=root / "variants",
        cache_dir=root / "calibration",
        log=log,
        target=target,
    ).path
    return _open_onnx(path, target, precision, "cuda" if cuda else "cpu")


def _torch(loaded: LoadedModel, device: str, precision: str, options: tuple) -> Runner:
    if precision == "int8":
        raise LungrtError("PyTorch runs fp32, fp16 and bf16; INT8 runs on onnxruntime, openvino or TensorRT")
    if precision == "fp16" and device == "cpu":
        raise LungrtError("PyTorch fp16 needs a CUDA GPU; on the CPU use bf16 (--backend torch) or --backend openvino")
    if precision == "bf16" and device == "cpu":
        from lungrt.training.train import bf16_autocast_supported

        if not bf16_autocast_supported():
            raise BackendUnavailable("no native bf16 on this CPU (oneDNN would emulate it, far slower than fp32)")
    if "cuda_graph" in options and device == "cpu":
        raise BackendUnavailable("CUDA graphs need a CUDA device")
    return TorchRunner(loaded, device=device, precision=precision, **{o: True for o in options})


def cpu_choice_file(loaded: LoadedModel, weights: str | None = None) -> Path:
    """Per weights (`weights`: their hash, if already known) and per CPU: servers with other CPUs
    sharing one cache keep their own choices."""
    from lungrt.core.cache import cache_root
    from lungrt.core.hardware import cpu_tag
    from lungrt.models.checkpoint import weights_hash

    return (
        cache_root() / "cpu-choice" / f"{loaded.info.name}-{weights or weights_hash(loaded.model)}-cpu{cpu_tag()}.json"
    )


def record_cpu_choice(loaded: LoadedModel, choice: dict) -> Path:
    """Remember `lungrt build --backend cpu --precision auto`'s choice (backend, precision, the
    gated variant file) for these weights on this CPU; infer/demo/the API pick it up."""
    from lungrt.core.hardware import cpu_identity
    from lungrt.data.io import atomic_write_bytes

    path = cpu_choice_file(loaded)
    path.parent.mkdir(parents=True, exist_ok=True)
    choice = {
        **choice,
        "path": str(Path(choice["path"]).resolve()),
        "hardware": cpu_identity(),
    }  # usable from any folder
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
        runner = _open_onnx(Path(choice["path"]), choice["backend"], choice["precision"], "cpu")
    except (LungrtError, KeyError) as e:
        log(f"ignoring {path.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return None
    if runner.weights_id != weights or runner.content_hash != choice.get("content_hash"):
        runner.close()
        log(
            f"ignoring {path.name}: its variant file is not the one that was gated; rerun `lungrt build --backend cpu "
            "--precision auto`"
        )
        return None
    log(
        (
            f"CPU configuration chosen by `lungrt build --backend cpu --precision "
            f"auto`: {choice['backend']} {choice['precision']}"
        )
    )
    return runner
