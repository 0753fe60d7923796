"""Which TensorRT flavour is at hand and for which GPUs: standard TensorRT (builds on the GPU it will run on)
or TensorRT for RTX (builds ahead of time, without a GPU, for a list of compute capabilities; default SM86,
the RTX 3090 class). Polygraphy is pointed at the flavour in use."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from dataclasses import dataclass

from lungrt.core.errors import LungrtError


log_ = logging.getLogger(__name__)


@dataclass(frozen=True)
class Flavour:
    name: str  # what users type: --backend NAME
    module: str  # the Python module it installs
    extra: str  # pip install 'lungrt[EXTRA]'
    aot: bool  # builds ahead of time for listed compute capabilities, no GPU needed


FLAVOURS = {
    "tensorrt": Flavour("tensorrt", "tensorrt", "trt", aot=False),
    "tensorrt-rtx": Flavour("tensorrt-rtx", "tensorrt_rtx", "rtx", aot=True),
}


DEFAULT_RTX_TARGETS = ("8.6",)  # the RTX 3090 / 30-series class


def parse_targets(text: str | None) -> tuple[str, ...]:
    """'sm86,sm89' or '8.6,8.9' -> ('8.6', '8.9')."""
    if not text:
        return DEFAULT_RTX_TARGETS
    out = []
    for item in text.replace(" ", "").split(","):
        digits = item.lower().removeprefix("sm_").removeprefix("sm").replace(".", "")
        if not digits.isdigit() or len(digits) < 2:
            raise LungrtError(f"--target: {item!r} is not a compute capability such as sm86 or 8.6")
        out.append(f"{digits[:-1]}.{digits[-1]}")
    return tuple(dict.fromkeys(out))


def target_tag(targets) -> str:
    return "+".join(f"sm{t.replace('.', '')}" for t in targets)


def import_flavour(flavour: Flavour):
    """The flavour's TensorRT module, or a LungrtError that says how to install it."""
    try:
        return importlib.import_module(flavour.module)
    except Exception as e:  # missing wheels, or libraries that fail to load
        raise LungrtError(
            f"{flavour.name} does not import ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            f"install it with: pip install 'lungrt[{flavour.extra}]'"
        ) from None


def gpu_environment() -> dict | None:
    """The visible NVIDIA GPU (name, compute capability), or None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def flavour_status(name: str) -> tuple[bool, str]:
    """(can build here, reason) for one flavour."""
    flavour = FLAVOURS[name]
    if importlib.util.find_spec(flavour.module) is None:
        return False, f"{flavour.module} is not installed; pip install 'lungrt[{flavour.extra}]'"
    if importlib.util.find_spec("polygraphy") is None:
        return False, f"polygraphy is missing; pip install 'lungrt[{flavour.extra}]'"
    try:
        trt = import_flavour(flavour)
    except LungrtError as e:
        return False, str(e)
    if flavour.aot:
        gpu = gpu_environment()
        runs = f"runs on {gpu['gpu']}" if gpu else "builds ahead of time; running engines needs an RTX GPU"
        return True, f"{flavour.module} {trt.__version__}: {runs}"
    gpu = gpu_environment()
    if gpu is None:
        return (
            False,
            (
                f"{flavour.module} {trt.__version__} imports but no NVIDIA GPU "
                f"is visible (standard TensorRT builds on the GPU it runs on)"
            ),
        )
    return True, f"{flavour.module} {trt.__version__} on {gpu['gpu']}"


def choose_flavour(backend: str) -> Flavour:
    """'tensorrt' / 'tensorrt-rtx' as asked, or for 'auto' the standard flavour where it can build
    (a GPU is present), else TensorRT-RTX where it is installed."""
    if backend in FLAVOURS:
        ok, why = flavour_status(backend)
        if not ok:
            raise LungrtError(f"--backend {backend}: {why}")
        return FLAVOURS[backend]
    for name in FLAVOURS:
        if flavour_status(name)[0]:
            return FLAVOURS[name]
    raise LungrtError(
        "no TensorRT flavour can build here: " + "; ".join(f"{n}: {flavour_status(n)[1]}" for n in FLAVOURS)
    )


def _polygraphy_for(flavour: Flavour) -> None:
    """Point Polygraphy at the flavour's module. Polygraphy binds its TensorRT module when its
    backend modules are first imported, so one process serves one flavour."""
    import polygraphy.config as pconfig

    want = flavour.aot
    if "polygraphy.backend.trt.loader" in sys.modules and pconfig.USE_TENSORRT_RTX != want:
        raise LungrtError(
            f"this process already loaded the other TensorRT flavour through Polygraphy; "
            f"build {flavour.name} engines in a separate process"
        )
    pconfig.USE_TENSORRT_RTX = want
