"""INT8 with its float layers in bf16: NNCF's INT8 graph with the K most sensitive layers left in float
(benchmarks/int8_layers.py's ranking), compiled by OpenVINO with the float parts in f32 (as lungrt
runs INT8 today) and in bf16 (`INFERENCE_PRECISION_HINT=bf16`), against OpenVINO FP32 and bf16.

    .venv/bin/python benchmarks/int8_bf16_mix.py --model gsconv-unet --keep 2,4,6

Needs results/int8_layers_<model>-cpu<tag>.json from this CPU and a CPU with native bf16. Batch 8,
img/s interleaved over `--rounds` rounds (median), mask agreement with PyTorch FP32 on 32
validation images. An experiment, not a lungrt configuration yet. Saves results/int8_bf16_mix_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx

from lungrt.backends.pytorch import TorchRunner
from lungrt.core.hardware import cpu_identity, cpu_tag
from lungrt.data.datasets import validation_pairs
from lungrt.data.io import read_xray
from lungrt.export.onnx import reference_inputs
from _nncf_onnx_route import make_int8_nncf_mixed, save_derived_int8
from lungrt.export.precision import load_calibration_set
from lungrt.build.variants import make_variant
from lungrt.models.checkpoint import resolve_model

RESULTS = Path(__file__).parent / "results"


class Compiled:
    def __init__(self, core, path: Path, hint: str):
        self.model = core.compile_model(
            str(path), "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        )
        self.request = self.model.create_infer_request()

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.request.infer({0: x})[0])


def img_per_s(c: Compiled, x: np.ndarray, seconds: float) -> float:
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        c.run(x)
        n += len(x)
    return n / (time.perf_counter() - t0)


def main() -> None:
    import openvino as ov

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gsconv-unet")
    ap.add_argument("--keep", default="2,4,6", help="how many of the most sensitive layers stay float")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/cxr-mc-sz"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lungrt-int8-bf16"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    loaded = resolve_model(args.model)
    pairs = validation_pairs(args.data)[:32]
    fp32 = make_variant(loaded, "fp32", folder=args.work).path
    ranking = json.loads((RESULTS / f"int8_layers_{args.model}-cpu{cpu_tag()}.json").read_text())["rows"]
    whole = args.work / f"{args.model}.whole.int8.onnx"
    make_int8_nncf_mixed(fp32, whole, load_calibration_set(loaded.spec, args.data))
    configs = {"OV fp32": (fp32, "f32"), "OV bf16": (fp32, "bf16")}
    for k in map(int, args.keep.split(",")):
        path = args.work / f"{args.model}.keep{k}.int8.onnx"
        save_derived_int8(onnx.load(str(whole)), onnx.load(str(fp32)), [r["node"] for r in ranking[:k]], path)
        configs[f"INT8, {k} layers float in f32"] = (path, "f32")
        configs[f"INT8, {k} layers float in bf16"] = (path, "bf16")
    core = ov.Core()
    compiled = {name: Compiled(core, path, hint) for name, (path, hint) in configs.items()}
    reference = TorchRunner(loaded)
    inputs = [loaded.spec.apply_xray(read_xray(p.image))[None] for p in pairs]
    truth = [reference.run(t)[0, 0] > 0.5 for t in inputs]
    agreement = {
        name: float(np.mean([((c.run(np.repeat(t, 8, 0))[0, 0] > 0.5) == m).mean() for t, m in zip(inputs, truth)]))
        for name, c in compiled.items()
    }
    x = reference_inputs(loaded.spec, 8)
    speeds = {name: [] for name in compiled}
    for _ in range(args.rounds):  # interleaved: the machine's noise hits every configuration alike
        for name, c in compiled.items():
            c.run(x)
            speeds[name].append(img_per_s(c, x, 3.0))
    base = statistics.median(speeds["OV fp32"])
    rows = [
        {
            "config": n,
            "img_per_s": round(statistics.median(s), 1),
            "vs_ov_fp32": round(statistics.median(s) / base, 2),
            "agreement": round(agreement[n], 5),
        }
        for n, s in speeds.items()
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"int8_bf16_mix_{args.model}.json").write_text(
        json.dumps({"model": args.model, "hardware": cpu_identity(), "rows": rows}, indent=1)
    )
    print(
        (
            f"\n{args.model}, batch 8, {', '.join(cpu_identity()['cpu_flags'])}; "
            f"median of {args.rounds} interleaved rounds\n"
        )
    )
    print("| configuration | img/s | x OV fp32 | agreement with PyTorch FP32 |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['img_per_s']} | {r['vs_ov_fp32']} | {r['agreement']:.5f} |")


if __name__ == "__main__":
    main()
