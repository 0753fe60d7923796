"""The CPU paths other machines take, run on this one: `lungrt build --backend cpu --precision auto`
under oneDNN capped to AVX2 and to AVX-512 VNNI (no AMX, no bf16), as on AMD EPYC and older Intel
servers. What the capped kernels compute differs by CPU; what must hold everywhere is asserted:
bf16 is skipped with its reason, every INT8 candidate is gated by the runner that executes it,
the choice passes its gate and is recorded for that instruction set, and nothing third-party
floods the terminal. A CPU without the instruction set cannot emulate it: skipped, with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lungrt.core.hardware import cpu_flags
from tests.test_cpu_int8 import assert_quiet

pytest.importorskip("openvino")
# cap -> (the lscpu flag it needs, PyTorch's matching ATen capability)
CAPS = {"AVX2": ("avx2", "avx2"), "AVX512_CORE_VNNI": ("avx512_vnni", "avx512")}


@pytest.mark.slow
@pytest.mark.parametrize("cap", sorted(CAPS))
def test_cpu_auto_build_under_an_emulated_instruction_set(cap, tmp_path, tiny_checkpoint, phantom_dir):
    flag, aten = CAPS[cap]
    if flag not in cpu_flags():
        pytest.skip(f"this CPU has no {flag}: oneDNN cannot be capped to {cap} here")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": cap, "ATEN_CPU_CAPABILITY": aten, "LUNGRT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "lungrt.cli", "build", "--model", str(tiny_checkpoint), "--backend", "cpu",
                           "--precision", "auto", "--data", str(phantom_dir), "--calib", str(phantom_dir), "--out",
                           str(tmp_path / "b")], env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert_quiet(proc.stdout, proc.stderr)
    report = json.loads((tmp_path / "b" / "unet-auto-cpu.json").read_text())
    by = {(c["backend"], c["precision"]): c for c in report["candidates"]}
    assert "no native bf16" in by[("openvino", "bf16")]["skipped"]  # capped below AVX-512 BF16 / AMX
    for key in (("onnxruntime", "int8"), ("openvino", "int8")):  # gated as deployed, or failed with the reason
        c = by[key]
        assert ("gate" in c and c["checked"] == "as deployed") or c.get("failed"), c
    chosen = next(c for c in report["candidates"] if f"{c['backend']} {c['precision']}" == report["choice"])
    assert chosen["gate"]["passed"]
    (record_file,) = (tmp_path / "cache" / "cpu-choice").glob("*.json")
    record = json.loads(record_file.read_text())
    assert record["hardware"]["isa_cap"] == cap and record["content_hash"] == chosen["runner"]["content_hash"]
