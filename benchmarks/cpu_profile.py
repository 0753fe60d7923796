"""Where the CPU engines spend their time, by operator type, for a model's CPU configurations:
ONNX Runtime FP32 (what CPU users ran before OpenVINO), OpenVINO FP32, BF16 and INT8 (NNCF).

    .venv/bin/python benchmarks/cpu_profile.py --model msag-unet --calib ../shared/data/cxr-mc-sz

Uses each engine's own profiler (ONNX Runtime's enable_profiling, OpenVINO's PERF_COUNT) over
`--runs` calls at batch `--batch` after a warm-up; kernel time only (no Python around it).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from lungrt.core.hardware import cpu_identity
from lungrt.export.onnx import reference_inputs
from lungrt.build.variants import make_variant
from lungrt.models.checkpoint import resolve_model

RESULTS = Path(__file__).parent / "results"


def profile_onnxruntime(path: Path, x: np.ndarray, runs: int) -> dict[str, float]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    opts.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})  # warm-up
    for _ in range(runs):
        sess.run(None, {name: x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"] / 1e3 / (runs + 1)
    return dict(by_op)


def profile_openvino(path: Path, x: np.ndarray, runs: int, hint: str) -> dict[str, float]:
    """ms per call by `node type (kernel)`, e.g. 'Convolution (brgconv_avx512_amx_bf16)'."""
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(str(path)),
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": hint,
            "PERF_COUNT": True,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": str(os.cpu_count() or 1),
        },
    )
    request = compiled.create_infer_request()
    for _ in range(2):
        request.infer({0: x})
    by_op: dict[str, float] = defaultdict(float)
    for _ in range(runs):
        request.infer({0: x})
        for p in request.get_profiling_info():
            if p.status == p.Status.EXECUTED:
                by_op[f"{p.node_type} ({p.exec_type})"] += p.real_time.total_seconds() * 1000 / runs
    return dict(by_op)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="msag-unet")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--calib", type=Path, default=None, help="calibration dataset (its validation split gates INT8)")
    ap.add_argument("--top", type=int, default=6)
    args = ap.parse_args()
    from lungrt.data.datasets import validation_pairs

    loaded = resolve_model(args.model)
    x = np.repeat(reference_inputs(loaded.spec, 1), args.batch, 0)
    fp32 = make_variant(loaded, "fp32").path
    gate = validation_pairs(args.calib) if args.calib else None
    int8 = make_variant(loaded, "int8", calib_dir=args.calib, val_pairs=gate, target="openvino").path
    configs = {
        "onnxruntime fp32": lambda: profile_onnxruntime(fp32, x, args.runs),
        "openvino fp32": lambda: profile_openvino(fp32, x, args.runs, "f32"),
        "openvino bf16": lambda: profile_openvino(fp32, x, args.runs, "bf16"),
        "openvino int8 (NNCF)": lambda: profile_openvino(int8, x, args.runs, "f32"),
    }
    out = {"hardware": cpu_identity(), "model": args.model, "batch": args.batch, "configs": {}}
    for name, run in configs.items():
        try:
            ops = run()
        except Exception as e:  # bf16 on a CPU without it, say
            print(f"\n{name}: not run ({str(e).splitlines()[0][:120]})")
            continue
        total = sum(ops.values())
        out["configs"][name] = {"total_ms": total, "by_op": ops}
        print(f"\n{args.model} {name}: {total:.1f} ms kernel time per batch of {args.batch}")
        for op, ms in sorted(ops.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {op:48s} {ms:8.1f} ms  {100 * ms / total:5.1f}%")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"cpu_profile_{args.model}.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
