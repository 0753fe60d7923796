"""NNCF's own search for the INT8 layers to keep in float, with lungrt's gate as its metric, on this CPU.

    .venv/bin/python benchmarks/int8_accuracy_control.py --model msag-unet --data ../shared/data/cxr-mc-sz

`nncf.quantize_with_accuracy_control` (OpenVINO backend) quantizes the FP32 graph, ranks the
quantized operations by how much reverting each to float recovers the metric, and reverts them one
at a time until the metric is within `--max-drop` of the FP32 graph's. The metric is lungrt's gate:
mask agreement with PyTorch FP32 on validation images (`--gate-images`, never test), measured by
OpenVINO on this CPU with float layers in f32, as lungrt runs INT8. Then the result, the whole-graph
INT8 and OpenVINO FP32 / bf16 are timed interleaved (batch 8, latency mode) and their agreement on
the same images is printed. Results: benchmarks/results/int8_accuracy_control_<model>.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from _common import save_result
from lungrt.backends.pytorch import TorchRunner
from lungrt.core.hardware import cpu_identity
from lungrt.core.logs import third_party_logs
from lungrt.data.datasets import validation_pairs
from lungrt.data.io import read_xray
from lungrt.export.precision import load_calibration_set
from lungrt.build.variants import make_variant
from lungrt.models.checkpoint import resolve_model


def agreement(compiled, inputs: np.ndarray, reference: np.ndarray) -> float:
    """Share of pixels whose mask verdict equals PyTorch FP32's, over the gate images."""
    same = []
    for x, ref in zip(inputs, reference):
        prob = next(iter(compiled(x[None]).values()))[0, 0]
        same.append(np.mean((prob > 0.5) == ref))
    return float(np.mean(same))


def img_per_s(compiled, batch: np.ndarray, seconds: float = 4.0) -> float:
    compiled(batch)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        compiled(batch)
        n += len(batch)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="msag-unet")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument(
        "--max-drop", type=float, default=0.005, help="agreement the search may lose against the FP32 graph"
    )
    ap.add_argument("--gate-images", type=int, default=32)
    ap.add_argument("--preset", default="mixed", choices=("mixed", "performance"))
    args = ap.parse_args()
    import openvino as ov

    loaded = resolve_model(args.model)
    fp32 = make_variant(loaded, "fp32").path
    pairs = validation_pairs(args.data, args.gate_images)
    inputs = np.stack([loaded.spec.apply_xray(read_xray(p.image)) for p in pairs]).astype(np.float32)
    reference = TorchRunner(loaded).run(inputs)[:, 0] > 0.5
    calib = load_calibration_set(loaded.spec, args.data)
    core = ov.Core()
    f32 = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    model = core.read_model(str(fp32))
    with third_party_logs("nncf"):
        import nncf

        calibration = nncf.Dataset([calib.inputs[i : i + 1] for i in range(len(calib.inputs))])
        validation = nncf.Dataset(list(range(len(inputs))))
        preset = nncf.QuantizationPreset(args.preset)
        t0 = time.perf_counter()
        whole = nncf.quantize(
            model, calibration, preset=preset, target_device=nncf.TargetDevice.CPU, subset_size=len(calib.inputs)
        )
        t_whole = time.perf_counter() - t0

        def metric(compiled, indices) -> float:
            return agreement(compiled, inputs[list(indices)], reference[list(indices)])

        t0 = time.perf_counter()
        controlled = nncf.quantize_with_accuracy_control(
            core.read_model(str(fp32)),
            calibration,
            validation,
            metric,
            max_drop=args.max_drop,
            drop_type=nncf.DropType.ABSOLUTE,
            preset=preset,
            target_device=nncf.TargetDevice.CPU,
            subset_size=len(calib.inputs),
        )
        t_search = time.perf_counter() - t0
    bf16 = {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY"}
    candidates = {
        "OpenVINO fp32": (core.read_model(str(fp32)), f32),
        "OpenVINO bf16": (core.read_model(str(fp32)), bf16),
        f"NNCF INT8, whole graph ({args.preset})": (whole, f32),
        f"NNCF INT8, accuracy control (max drop {args.max_drop})": (controlled, f32),
    }
    compiled = {}
    for name, (m, config) in candidates.items():
        try:
            compiled[name] = core.compile_model(m, "CPU", config)
        except RuntimeError as e:  # bf16 under an AVX2 cap: oneDNN has no bf16 deconvolution there
            print(f"{name}: not compiled on this CPU ({str(e).splitlines()[-1][:120]})")
    batch = inputs[:8]
    eager = TorchRunner(loaded)
    timed = {**compiled, "PyTorch eager fp32": lambda x: {0: eager.run(x)}}
    speeds = {k: [] for k in timed}
    for r in range(3):  # interleaved rounds: this VM drifts
        for name in list(timed) if r % 2 == 0 else list(timed)[::-1]:
            speeds[name].append(img_per_s(timed[name], batch))
    fake_quantizes = {
        k: sum(op.get_type_name() == "FakeQuantize" for op in m.get_ops())
        for k, m in (("whole", whole), ("controlled", controlled))
    }
    rows = {
        name: {
            "agreement": agreement(c, inputs, reference) if name in compiled else 1.0,
            "img_per_s": float(np.median(speeds[name])),
        }
        for name, c in timed.items()
    }
    base, eager_rate = rows["OpenVINO fp32"]["img_per_s"], rows["PyTorch eager fp32"]["img_per_s"]
    result = {
        **cpu_identity(),
        "model": args.model,
        "gate_images": len(inputs),
        "preset": args.preset,
        "max_drop": args.max_drop,
        "quantize_s": round(t_whole, 1),
        "accuracy_control_s": round(t_search, 1),
        "fake_quantize_ops": fake_quantizes,
        "rows": rows,
    }
    save_result(f"int8_accuracy_control_{args.model}", result, echo=False)
    print(
        f"\n{args.model} on {result['cpu']} ({' '.join(result['cpu_flags'])}); "
        "batch 8, median of 3 interleaved rounds; "
        f"agreement with PyTorch FP32 on {len(inputs)} validation images; FakeQuantize ops whole graph "
        f"{fake_quantizes['whole']}, after accuracy control {fake_quantizes['controlled']}; search {t_search:.0f} s\n"
    )
    print("| configuration | agreement | img/s | vs OpenVINO fp32 | vs PyTorch eager |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['agreement']:.5f} | {r['img_per_s']:.1f} | {r['img_per_s'] / base:.2f}x | "
            f"{r['img_per_s'] / eager_rate:.1f}x |"
        )


if __name__ == "__main__":
    main()
