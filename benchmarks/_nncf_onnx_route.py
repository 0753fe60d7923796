"""NNCF's ONNX backend route to OpenVINO INT8 (a Q/DQ ONNX file that OpenVINO imports) and the graph
surgery that leaves chosen layers of such a file in float: what lungrt's build used before its
OpenVINO INT8 became an IR quantized by NNCF on the OpenVINO model (agreement 0.95 against 0.9995 for
gsconv-unet on CPUs without AMX). Kept for the benchmarks that measured it (`int8_layers.py`,
`int8_bf16_mix.py`); not part of the library.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from lungrt.core.errors import LungrtError
from lungrt.export.onnx import set_metadata
from lungrt.export.precision import CalibrationSet, _finish_int8, _save


def make_int8_nncf(
    fp32_path: str | Path,
    out_path: str | Path,
    calib: CalibrationSet,
    method: str = "nncf",
    exclude: list[str] | None = None,
    cache_dir: str | Path | None = None,
    preset: str = "performance",
) -> dict:
    """INT8 for OpenVINO by NNCF post-training quantization. Preset "performance" (symmetric) is
    the form OpenVINO's AMX INT8 kernels run fastest (the asymmetric "mixed" measured 2x slower
    there); "mixed" is the fallback where the symmetric form fails the gate (OpenVINO's non-AMX
    kernels, emulated: msag-unet 0.985 -> 0.990, gsconv-unet 0.934 -> 0.860; the search keeps the better).
    `method` is NNCF's own (min-max with its statistics and fast bias correction)."""
    from lungrt.core.logs import third_party_logs

    with third_party_logs("nncf"):
        import nncf

        model = onnx.load(str(fp32_path))
        meta = {p.key: p.value for p in model.metadata_props}
        name = model.graph.input[0].name
        data = nncf.Dataset([calib.inputs[i : i + 1] for i in range(len(calib.inputs))], lambda x: {name: x})
        q = nncf.quantize(
            model,
            data,
            preset=nncf.QuantizationPreset(preset),
            target_device=nncf.TargetDevice.CPU,
            subset_size=len(calib.inputs),
            ignored_scope=nncf.IgnoredScope(names=list(exclude or []), validate=False),
        )
    _finish_int8(q, meta, out_path, calib, "nncf" if preset == "performance" else f"nncf-{preset}", exclude, "openvino")
    return {"path": str(out_path), "excluded": list(exclude or [])}


def make_int8_nncf_mixed(
    fp32_path, out_path, calib: CalibrationSet, method: str = "nncf", exclude=None, cache_dir=None
) -> dict:
    return make_int8_nncf(fp32_path, out_path, calib, method, exclude, cache_dir, preset="mixed")


# Ops that move or pick values without computing new ones: a quantizer NNCF places for a layer can
# sit above them (before the MaxPool that feeds a Conv), so floating that layer's input walks up
# through them.
_TRANSPARENT = {
    "MaxPool",
    "Relu",
    "Reshape",
    "Transpose",
    "Resize",
    "Concat",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Slice",
    "Pad",
    "AveragePool",
}


def dequantize_nodes(quantized: onnx.ModelProto, fp32: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `quantized` in which the nodes `names` compute in float again, as NNCF's ignored
    scope would leave them: each reads its activations from before the fake-quantize (Q/DQ) pairs
    placed for it, walking up through data-movement ops (copied in float where they read a
    quantizer), and its own FP32 weights and bias (which bias correction may have changed in the
    quantized graph). Q/DQ nodes nothing reads any more are dropped; other readers of a shared
    quantizer stay quantized.

    Deriving an exclusion set this way costs graph surgery instead of a new calibration (NNCF
    collects its statistics again on every call): the INT8 search measures each block on the one
    whole-graph quantization."""
    from onnx import numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    g = model.graph
    originals = {n.name: n for n in fp32.graph.node}
    fp32_inits = {i.name: i for i in fp32.graph.initializer}
    producers = {o: n for n in g.node for o in n.output}
    floated: dict[str, str] = {}
    added: list = []

    def float_of(tensor: str) -> str:
        """A tensor carrying `tensor`'s value without the fake-quantizers above it (itself if none)."""
        if tensor in floated:
            return floated[tensor]
        node, result = producers.get(tensor), tensor
        if node is not None and node.op_type == "DequantizeLinear":
            q = producers.get(node.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                result = float_of(q.input[0])
        elif node is not None and node.op_type in _TRANSPARENT and len(node.output) == 1:
            inputs = [float_of(i) if i else i for i in node.input]
            if inputs != list(node.input):
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                copy.name, result = f"{node.name}__float", f"{tensor}__float"
                del copy.input[:]
                copy.input.extend(inputs)
                copy.output[0] = result
                added.append(copy)
        floated[tensor] = result
        return result

    wanted = set(names)
    for node in list(g.node):
        if node.name not in wanted or node.name not in originals:
            continue
        for k, src in enumerate(originals[node.name].input):
            if k >= len(node.input) or not src:
                continue
            if src in fp32_inits:  # weights and bias: the FP32 values, under a name of their own
                name = f"{src}__fp32"
                if name not in floated.values():
                    g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(fp32_inits[src]), name))
                    floated[f"init:{src}"] = name
                node.input[k] = name
            else:
                node.input[k] = float_of(node.input[k])
    g.node.extend(added)
    _topological_sort(g)
    _drop_unread(g)
    return model


def _topological_sort(g) -> None:
    """ONNX wants nodes in an order where every input is made before it is read."""
    ready = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending, ordered = list(g.node), []
    while pending:
        left = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                left.append(n)
        if len(left) == len(pending):
            raise LungrtError("dequantize_nodes: the graph has a cycle or a missing input")
        pending = left
    del g.node[:]
    g.node.extend(ordered)


def _drop_unread(g) -> None:
    """Remove nodes none of whose outputs is read (repeatedly), then unread initializers."""
    outputs = {o.name for o in g.output}
    while True:
        read = {i for n in g.node for i in n.input} | outputs
        dead = [n for n in g.node if not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    read = {i for n in g.node for i in n.input} | outputs
    for init in [i for i in g.initializer if i.name not in read]:
        g.initializer.remove(init)


def save_derived_int8(
    whole: onnx.ModelProto,
    fp32: onnx.ModelProto,
    exclude: list[str],
    out_path: str | Path,
    floated: list[str] | None = None,
) -> None:
    """`dequantize_nodes` of a whole-graph INT8 variant (the nodes `floated`, by default the
    excluded ones), saved with its exclusions recorded."""
    model = dequantize_nodes(whole, fp32, floated if floated is not None else exclude)
    meta = {p.key: p.value for p in model.metadata_props}
    cal = json.loads(meta.get("lungrt.calibration", "{}"))
    set_metadata(model, {"lungrt.calibration": json.dumps({**cal, "excluded_nodes": list(exclude)})})
    _save(model, out_path)
