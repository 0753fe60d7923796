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


def cpu_identity() -> dict:
    """What a speed measurement is valid for: the CPU model, its speed flags and the core count."""
    return {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "cpu_count": os.cpu_count()}
