"""Facts about this machine's CPU that decide which engine and precision are fastest here."""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


SPEED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_flags() -> list[str]:
    """The instruction-set flags that decide CPU speed (from /proc/cpuinfo, as lscpu shows them)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in SPEED_FLAGS if f in have]
    except OSError:
        pass
    return []


# oneDNN (OpenVINO's and PyTorch's CPU kernels) can be capped below what the CPU has: the kernels,
# and with them the INT8 results, then are those of the capped instruction set
ISA_CAP_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def cpu_identity() -> dict:
    """What a speed measurement or a CPU INT8 gate is valid for: the CPU model, its speed flags,
    the core count and any cap on oneDNN's instruction set."""
    ident = {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count()}
    cap = next((os.environ[v] for v in ISA_CAP_VARIABLES if os.environ.get(v)), None)
    return {**ident, "isa_cap": cap} if cap else ident


def cpu_tag() -> str:
    """A short stable name for `cpu_identity()`, for file names."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(cpu_identity(), sort_keys=True).encode()).hexdigest()[:8]
