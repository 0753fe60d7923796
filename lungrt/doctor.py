"""What is installed and which backends can run here, with the reason for each that cannot."""

from __future__ import annotations

import importlib
import platform

from lungrt.core.hardware import cpu_flags


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as e:  # an import can fail with more than ImportError (missing CUDA libs)
        return f"not installed ({type(e).__name__}: {str(e).splitlines()[0][:120]})" if str(e) else "not installed"


def tensorrt_status(flavour: str = "tensorrt") -> tuple[bool, str]:
    """(can build here, reason) for a TensorRT flavour: `tensorrt` or `tensorrt-rtx`."""
    from lungrt.backends.tensorrt import flavour_status

    return flavour_status(flavour)


def onnxruntime_providers() -> list[str]:
    try:
        import onnxruntime as ort

        return list(ort.get_available_providers())
    except Exception:
        return []


def openvino_status() -> tuple[bool, str]:
    from lungrt.backends.openvino import native_bf16, openvino_core
    from lungrt.core.errors import BackendUnavailable

    try:
        openvino_core()
    except BackendUnavailable as e:
        return False, str(e)
    return True, "fp32, int8 (NNCF)" + (", bf16 (native on this CPU)" if native_bf16() else "; no native bf16 here")


def gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [
        f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))})"
        for i in range(torch.cuda.device_count())
    ]


def collect() -> dict:
    import torch

    providers = onnxruntime_providers()
    versions = {"python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}"}
    for mod in (
        "lungrt",
        "torch",
        "onnx",
        "onnxruntime",
        "onnxslim",
        "openvino",
        "nncf",
        "tensorrt",
        "tensorrt_rtx",
        "polygraphy",
    ):
        versions[mod] = _version(mod)
    versions["torch cpu capability"] = torch.backends.cpu.get_cpu_capability()
    versions["cpu flags (lscpu)"] = " ".join(cpu_flags()) or "unknown"
    cuda_ok = torch.cuda.is_available()
    backends = {
        "torch-cpu": (True, f"torch {torch.__version__}"),
        "torch-cuda": (
            cuda_ok,
            "CUDA available"
            if cuda_ok
            else f"no CUDA device (torch {torch.__version__}, cuda build: {torch.version.cuda or 'no'})",
        ),
        "onnxruntime-cpu": ("CPUExecutionProvider" in providers, ", ".join(providers) or "onnxruntime not installed"),
        "onnxruntime-cuda": (
            "CUDAExecutionProvider" in providers,
            "CUDAExecutionProvider present"
            if "CUDAExecutionProvider" in providers
            else "no CUDAExecutionProvider (install onnxruntime-gpu on a CUDA machine)",
        ),
        "openvino-cpu": openvino_status(),
        "tensorrt (build + run)": tensorrt_status("tensorrt"),
        "tensorrt-rtx (build)": tensorrt_status("tensorrt-rtx"),
    }
    return {"versions": versions, "gpus": gpus(), "backends": backends}


def engine_checks(plan) -> list[tuple[str, bool, str]]:
    """Can this plan run here? (check, passed, detail) for its sidecar and content, its TensorRT
    flavour and exact version, and the GPU (present, compute capability among its targets)."""
    from pathlib import Path

    from lungrt.backends.integrity import IR_SUFFIX, load_verified
    from lungrt.backends.tensorrt import (
        FLAVOURS,
        gpu_environment,
        import_flavour,
        read_plan_metadata,
        runtime_reasons,
    )
    from lungrt.core.errors import LungrtError

    if Path(plan).suffix in (IR_SUFFIX, ".onnx"):  # not a plan: say what it is, and whether its content checks out
        kind = "OpenVINO IR" if Path(plan).suffix == IR_SUFFIX else "ONNX file"
        try:
            digest = load_verified(plan).content_hash
        except LungrtError as e:
            return [(kind, False, str(e))]
        return [
            (kind, True, f"content sha256 {digest[:16]} matches (graph, weights and lungrt metadata)"),
            (
                "TensorRT plan",
                False,
                f"an {kind} runs on the CPU engines (`lungrt infer --onnx {plan}`), not as a TensorRT plan",
            ),
        ]
    try:
        meta = read_plan_metadata(Path(plan))
    except LungrtError as e:
        return [("plan and sidecar", False, str(e))]
    flavour = FLAVOURS.get(meta.get("flavour", "tensorrt"))
    built = f"{meta.get('flavour')} {meta.get('tensorrt')}, " + (
        f"targets {', '.join(meta['targets'])}" if meta.get("targets") else f"GPU {meta.get('gpu')}"
    )
    checks = [
        (
            "plan and sidecar",
            True,
            f"{meta['model']['name']} {meta['precision']}, plan sha256 {meta['plan_hash'][:16]} "
            f"and sidecar digest match; built with {built}",
        )
    ]
    try:
        installed = import_flavour(flavour).__version__
    except LungrtError as e:
        return checks + [("TensorRT", False, str(e))]
    same = installed == meta.get("tensorrt")
    checks.append(
        (
            "TensorRT",
            same,
            f"{flavour.module} {installed} installed"
            + (
                ""
                if same
                else f"; the plan needs exactly {meta.get('tensorrt')}: pip install '{flavour.module.replace('_', '-')}"
                f"{'-cu12' if flavour.aot else ''}=={meta.get('tensorrt')}'"
            ),
        )
    )
    gpu = gpu_environment()
    if gpu is None:
        return checks + [("GPU", False, "no NVIDIA GPU visible: the plan cannot run on this machine")]
    reasons = [r for r in runtime_reasons(meta, installed, gpu) if not r.startswith("built with")]
    return checks + [("GPU", not reasons, "; ".join(reasons) or f"{gpu['gpu']} (sm {gpu['compute_capability']})")]
