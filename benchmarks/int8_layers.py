"""Which layers of OpenVINO's NNCF INT8 graph lose the agreement with PyTorch FP32, on this CPU.

    .venv/bin/python benchmarks/int8_layers.py --model msag-unet --data ../shared/data/cxr-mc-sz

For each quantizable layer (Conv, ConvTranspose, MatMul, Gemm) of the whole-graph NNCF INT8 file
(the preset the CPU build's search starts from: the better of PERFORMANCE and MIXED), the layer
alone is left in float (`dequantize_nodes`: its inputs from before its quantizers, its own FP32
weights) and the mask agreement with PyTorch FP32 is measured on validation images by OpenVINO,
the engine that runs it. The gain over the whole INT8 graph is the layer's share of the loss.
Prints a Markdown table (most sensitive first) and saves results/int8_layers_<model>-cpu<tag>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import onnx

from lungrt.core.hardware import cpu_identity, cpu_tag
from lungrt.data.datasets import validation_pairs
from lungrt.evaluation.parity import compare
from _nncf_onnx_route import dequantize_nodes, make_int8_nncf, make_int8_nncf_mixed, save_derived_int8
from lungrt.export.precision import load_calibration_set, node_block, quantizable_nodes
from lungrt.build.variants import make_variant
from lungrt.backends.pytorch import TorchRunner
from lungrt.build.resolve import open_runner
from lungrt.models.checkpoint import resolve_model

RESULTS = Path(__file__).parent / "results"


def agreement(loaded, path: Path, pairs) -> float:
    with open_runner(path, backend="openvino", precision="int8") as r:
        return compare(TorchRunner(loaded), r, pairs, distances=False)["summary"]["mask_agreement"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="msag-unet")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/cxr-mc-sz"))
    ap.add_argument("--images", type=int, default=32, help="validation images per measurement")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lungrt-int8-layers"))
    args = ap.parse_args()
    loaded = resolve_model(args.model)
    pairs = validation_pairs(args.data)[: args.images]
    fp32 = make_variant(loaded, "fp32", folder=args.work).path
    calib = load_calibration_set(loaded.spec, args.data)
    path = args.work / f"{args.model}.int8.onnx"
    whole = {}
    for name, quantize in (("PERFORMANCE", make_int8_nncf), ("MIXED", make_int8_nncf_mixed)):
        quantize(fp32, path, calib)
        whole[name] = (agreement(loaded, path, pairs), onnx.load(str(path)))
        print(f"whole graph, NNCF {name}: agreement {whole[name][0]:.4f}", flush=True)
    preset = max(whole, key=lambda k: whole[k][0])
    base, quantized = whole[preset]
    fp32_model = onnx.load(str(fp32))
    ops = {n.name: n.op_type for n in fp32_model.graph.node}
    rows = []
    for node in quantizable_nodes(fp32):
        save_derived_int8(quantized, fp32_model, [node], path)
        gain = agreement(loaded, path, pairs) - base
        rows.append({"node": node, "op": ops[node], "block": node_block(node), "gain": gain})
        print(f"  {node}: {gain:+.4f}", flush=True)
    rows.sort(key=lambda r: -r["gain"])
    everything = dequantize_nodes(quantized, fp32_model, [n.name for n in quantized.graph.node])
    assert not any(n.op_type == "QuantizeLinear" for n in everything.graph.node)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"int8_layers_{args.model}-cpu{cpu_tag()}.json"
    out.write_text(
        json.dumps(
            {
                "model": args.model,
                "hardware": cpu_identity(),
                "preset": preset,
                "images": len(pairs),
                "whole_graph": {k: v[0] for k, v in whole.items()},
                "rows": rows,
            },
            indent=2,
        )
    )
    print(
        f"\n{args.model}, NNCF {preset} (whole graph {base:.4f}), {len(pairs)} validation images, "
        f"{', '.join(cpu_identity()['cpu_flags'])}\n"
    )
    print("| layer | op | agreement gained when only it is float |")
    print("|---|---|---|")
    for r in rows[:10]:
        print(f"| `{r['node']}` | {r['op']} | {r['gain']:+.4f} |")
    print(f"\nall {len(rows)} layers' gains sum to {sum(r['gain'] for r in rows):+.4f}; saved {out}")


if __name__ == "__main__":
    main()
