"""The GPU check script, dry: the same code path on this CPU at tiny sizes, so a lent GPU's minutes are never
spent finding a broken script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_dry_run_writes_every_part(tmp_path):
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--dry"], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = result["parts"]
    assert result["dry"] and result["environment"]["device"] == "cpu" and "cpu_flags" in result["environment"]
    assert {(r["precision"], r["batch"]) for r in parts["throughput"]["rows"]} == {
        ("fp16", 1), ("fp16", 2), ("bf16", 1), ("bf16", 2)
    }  # fmt: skip
    assert all(r["img_per_s"] > 0 for r in parts["throughput"]["rows"])
    assert all(0.0 <= r["mask_agreement"] <= 1.0 and r["max_abs_prob_diff"] >= 0 for r in parts["parity"]["rows"])
    e2e = parts["end_to_end"]
    assert e2e["images"] == 4 and e2e["pool"] == "process" and e2e["ratio"] > 0
