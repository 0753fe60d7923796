"""The CPU paths other machines take, run on this one: the tests whose outcome depends on CPU
kernels (OpenVINO fp32/bf16/INT8, NNCF and the INT8 search, the CPU choice and infer using it, PyTorch
masks through the native-size resize) run
again with oneDNN capped to AVX2 and to AVX-512 VNNI (no AMX, no bf16), as on AMD EPYC and older
Intel servers, with PyTorch's ATen capability to match. Those tests assert only what holds on every
CPU (gates measured by the runner that executes, bf16 refused where it is not native, choices
recorded per instruction set). A CPU without the instruction set cannot emulate it: skipped, with
the reason. ONNX Runtime's MLAS kernels cannot be capped; its INT8 accuracy is asserted only where
the CPU has VNNI (tests/test_cpu_int8.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lungrt.core.hardware import cpu_flags

pytest.importorskip("openvino")
ROOT = Path(__file__).resolve().parents[1]
# cap -> (the lscpu flag it needs, PyTorch's matching ATen capability)
CAPS = {"AVX2": ("avx2", "avx2"), "AVX512_CORE_VNNI": ("avx512_vnni", "avx512")}
KERNEL_DEPENDENT = [
    "tests/test_cpu_int8.py",
    "tests/test_openvino.py",
    # PyTorch masks of native-size films through the banded resize vs OpenCV's
    "tests/test_preprocess.py::test_native_size_masks_are_unchanged_by_the_banded_resize",
]


@pytest.mark.slow
@pytest.mark.parametrize("cap", sorted(CAPS))
def test_kernel_dependent_tests_pass_under_an_emulated_instruction_set(cap):
    flag, aten = CAPS[cap]
    flags = cpu_flags()
    if flag not in flags:
        pytest.skip(f"this CPU has no {flag}: oneDNN cannot be capped to {cap} here")
    if cap == "AVX2" and not any(f.startswith("avx512") for f in flags):
        pytest.skip("this CPU has AVX2 and nothing above it: the native run is already the AVX2 class's")
    if cap == "AVX512_CORE_VNNI" and "amx_int8" not in flags:
        # the native run is already this class's INT8 (VNNI, no AMX); the AVX2 run covers a CPU without bf16
        pytest.skip("this CPU is of that class already (AVX-512 VNNI, no AMX): the native run covers it")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": cap, "ATEN_CPU_CAPABILITY": aten}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_DEPENDENT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1], proc.stdout[-1000:]
