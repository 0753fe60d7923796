"""ONNX export: opset 17, dynamic batch, simplified with onnxslim, checked, and proved equal to
PyTorch before it is written. The model identity and preprocessing spec go into the ONNX metadata,
so every consumer (ONNX Runtime, TensorRT build, infer) reads the same spec."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from lungrt._version import __version__
from lungrt.models.checkpoint import LoadedModel, weights_hash
from lungrt.data.io import temp_path_for
from lungrt.backends.base import INPUT_NAME, OUTPUT_NAME
from lungrt.models import ProbabilityModel
from lungrt.backends.integrity import seal

OPSET = 17
# Bumped when the exported graph changes for the same weights (2: gated convs split; 3: content hash), so that
# variants cached by an older lungrt are made again rather than reused.
EXPORT_REVISION = "3"
FP32_TOLERANCE = 1e-4  # max |probability difference| accepted between ONNX Runtime and PyTorch


def set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for k, v in entries.items():
        if k in existing:
            existing[k].value = v
        else:
            model.metadata_props.add(key=k, value=v)


def reference_inputs(spec, batch: int = 2, seed: int = 0) -> np.ndarray:
    """Phantom X-rays through the spec: realistic value ranges for equality checks."""
    from lungrt.data.phantoms import make_phantom

    return np.stack([spec.apply(make_phantom(seed + i, spec.size).image) for i in range(batch)])


def export_onnx(loaded: LoadedModel, out_path: str | Path, check: Callable[[Path], None] | None = None) -> Path:
    """The FP32 ONNX graph of `loaded` at `out_path`, sealed. `check(path)`: run on the written graph before it
    takes its name (build passes `evaluation.parity.check_export`: ONNX Runtime against PyTorch); a check that
    raises leaves no file."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    spec = loaded.spec
    model = ProbabilityModel(loaded.model).eval().float()
    example = torch.from_numpy(reference_inputs(spec, 1))
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter warns that it is legacy
            torch.onnx.export(
                model,
                (example,),
                str(raw),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        graph = simplify(split_fused_convs(simplify(onnx.load(str(raw)))))
    set_metadata(
        graph,
        {
            "lungrt.model": json.dumps(loaded.info.to_dict(), sort_keys=True),
            "lungrt.core.spec": spec.to_json(),
            "lungrt.export.precision": "fp32",
            "lungrt.weights_hash": weights_hash(loaded.model),
            "lungrt.version": __version__,
            "lungrt.export.revision": EXPORT_REVISION,
        },
    )
    graph.producer_name, graph.producer_version = "lungrt", __version__
    onnx.checker.check_model(graph, full_check=True)
    tmp_out = temp_path_for(out_path)
    seal(graph)
    try:
        onnx.save(graph, str(tmp_out))
        if check is not None:
            check(tmp_out)
        tmp_out.replace(out_path)
    finally:
        tmp_out.unlink(missing_ok=True)
    return out_path


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim: constant folding, dead-node removal and op fusion, keeping the dynamic batch."""
    import onnxslim

    return onnxslim.slim(model)


def split_fused_convs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Conv -> Split(axis 1) becomes one Conv per part, with the matching slices of its weights.

    GSConv computes its feature and gate convs as one conv and splits the channels; the split
    point (e.g. 12 of 24) cuts through the 16-channel blocks CPU plugins store activations in, and
    OpenVINO then ran the split and everything after it with slow reference kernels (half of
    gsconv-unet's time). Each output channel is computed exactly as before."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}
    for n in g.node:
        for name in n.input:
            readers[name] = readers.get(name, 0) + 1
    for split in [n for n in g.node if n.op_type == "Split"]:
        conv = producer.get(split.input[0])
        axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
        if conv is None or conv.op_type != "Conv" or readers[conv.output[0]] != 1 or axis != 1:
            continue
        if len(split.input) < 2 or split.input[1] not in inits or conv.input[1] not in inits:
            continue
        sizes = numpy_helper.to_array(inits[split.input[1]]).tolist()
        params = [numpy_helper.to_array(inits[name]) for name in conv.input[1:] if name]
        at = list(g.node).index(conv)
        start = 0
        for k, (size, out) in enumerate(zip(sizes, split.output)):
            names = []
            for name, p in zip(conv.input[1:], params):
                names.append(f"{name}__part{k}")
                g.initializer.append(numpy_helper.from_array(p[start : start + size], names[-1]))
            part = helper.make_node("Conv", [conv.input[0], *names], [out], name=f"{conv.name}__part{k}")
            part.attribute.extend(conv.attribute)
            g.node.insert(at + 1 + k, part)
            start += size
        g.node.remove(conv)
        g.node.remove(split)
    return model
