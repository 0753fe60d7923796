"""Precision variants written into the ONNX graph, as TensorRT's strongly typed builds need them.

- fp32: the exported graph.
- fp16: weights and compute in FP16 (onnxconverter-common's float16 converter), graph inputs and
  outputs kept FP32, numerically sensitive ops (softmax, normalisation, reductions, exp/pow) kept
  FP32 behind Cast nodes.
- int8, one recipe per engine, all from the same calibration set and gated the same way:
  - portable (`make_int8`): explicit Q/DQ, symmetric INT8 activations and per-channel weights, the
    form TensorRT's explicit quantization compiles (the TensorRT variant adds FP16, below);
  - onnxruntime (`make_int8_ort_cpu`): what ONNX Runtime's CPU kernels want: its pre-processing,
    asymmetric UINT8 activations (ReLUs fold into the quantizer), per-channel symmetric weights;
  - openvino (`make_int8_openvino`): NNCF post-training quantization of the OpenVINO model itself
    (NNCF's OpenVINO backend), saved as a sealed OpenVINO IR; under a gate, NNCF's accuracy control
    reverts the most sensitive operations (`nncf_openvino`). NNCF's ONNX backend (a Q/DQ ONNX file
    OpenVINO imports; benchmarks/_nncf_onnx_route.py) agreed 0.95 where this agrees 0.9995 on CPUs
    without AMX.
  ONNX Runtime's calibration ranges are cached under calibration/ keyed by model hash,
  calibration-set hash and method.

ONNX Runtime runs every variant on the CPU, so each one is checked here before any engine exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from lungrt.core.errors import LungrtError
from lungrt.export.onnx import set_metadata
from lungrt.data.io import temp_path_for
from lungrt.backends.base import onnx_metadata
from lungrt.backends.integrity import seal

log_ = logging.getLogger(__name__)
PRECISIONS = ("fp32", "fp16", "int8")
CALIBRATION_METHODS = ("entropy", "minmax", "percentile")
# Kept FP32 in the FP16 graph: accumulations whose range or precision FP16 cannot hold.
FP16_KEEP_FP32_OPS = [
    "Softmax",
    "LayerNormalization",
    "GroupNormalization",
    "InstanceNormalization",
    "BatchNormalization",
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "GlobalAveragePool",
    "Exp",
    "Pow",
    "Sqrt",
    "Log",
    "Erf",
]
# Ops whose inputs get Q/DQ: the GEMM-like layers that INT8 speeds up, on TensorRT and ORT CPU alike.
INT8_OP_TYPES = ["Conv", "ConvTranspose", "MatMul", "Gemm"]
# ONNX Runtime CPU: no quantized ConvTranspose kernel; the data-movement ops between quantized
# convs are quantized too so QLinear ops chain without going back to float.
ORT_CPU_INT8_OP_TYPES = ["Conv", "MatMul", "Gemm", "Relu", "MaxPool", "Concat", "Add", "Mul", "Resize"]
DEFAULT_CALIBRATION_IMAGES = 64


def make_fp16(fp32_path: str | Path, out_path: str | Path) -> Path:
    from onnxconverter_common import float16

    model = unshare_initializers(onnx.load(str(fp32_path)))
    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_FP32_OPS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one line per tiny weight flushed to FP16's range: noise
        fp16 = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    # The converter leaves stale value_info types behind the casts it adds after blocked ops
    # (seen on the attention gates' Resize); drop them and let shape inference recompute.
    del fp16.graph.value_info[:]
    fp16 = onnx.shape_inference.infer_shapes(fp16)
    set_metadata(fp16, {"lungrt.export.precision": "fp16", "lungrt.fp16_kept_fp32_ops": ",".join(FP16_KEEP_FP32_OPS)})
    onnx.checker.check_model(fp16)
    _save(fp16, out_path)
    return Path(out_path)


def make_int8_fp16(int8_path: str | Path, out_path: str | Path) -> Path:
    """The INT8 variant for TensorRT: the same Q/DQ graph, with everything that is not INT8 in FP16
    (kept FP32 exactly where the FP16 variant keeps it). Engines are strongly typed, so without this
    every unquantized layer of the INT8 engine would run in FP32.

    Q/DQ scales become FP16 too, so each DequantizeLinear yields FP16 directly (no Cast between it
    and the layer it feeds); FP16 scales need opset 19."""
    from onnx import version_converter
    from onnxconverter_common import float16

    model = onnx.load(str(int8_path))
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("lungrt.export.precision") != "int8":
        raise LungrtError(f"{int8_path}: not an INT8 variant")
    if max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < 19:
        model = version_converter.convert_version(model, 19)
    model = unshare_initializers(model)
    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_FP32_OPS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=block)
    del half.graph.value_info[:]
    half = onnx.shape_inference.infer_shapes(half)
    del half.metadata_props[:]
    set_metadata(half, {**meta, "lungrt.int8_float": "fp16", "lungrt.fp16_kept_fp32_ops": ",".join(FP16_KEEP_FP32_OPS)})
    onnx.checker.check_model(half)
    _save(half, out_path)
    return Path(out_path)


# Ops that move or reinterpret data rather than compute: left out of the dtype census.
_NOT_COMPUTE = {
    "Cast",
    "QuantizeLinear",
    "DequantizeLinear",
    "Constant",
    "ConstantOfShape",
    "Shape",
    "Gather",
    "Unsqueeze",
    "Squeeze",
    "Concat",
    "Reshape",
    "Transpose",
    "Identity",
    "Slice",
    "Flatten",
    "Range",
    "Expand",
    "Where",
    "Equal",
    "Split",
    "Size",
}


def dtype_census(path: str | Path) -> dict:
    """Output dtypes of the compute nodes of a graph, after shape inference: what a strongly typed
    TensorRT engine runs each layer in. Returns counts per dtype and the FP32 compute by op type."""
    from collections import Counter

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = model.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.value_info, *g.output, *g.input]}
    counts: Counter = Counter()
    fp32_ops: Counter = Counter()
    for node in g.node:
        if node.op_type in _NOT_COMPUTE:
            continue
        name = onnx.TensorProto.DataType.Name(types.get(node.output[0], 0)).lower()
        name = {"float": "float32", "undefined": "unknown"}.get(name, name)
        counts[name] += 1
        if name == "float32":
            fp32_ops[node.op_type] += 1
    return {"compute_nodes": dict(sorted(counts.items())), "float32_ops": dict(sorted(fp32_ops.items()))}


def unshare_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every node its own copy of a shared initializer. The simplifier merges identical
    constants (e.g. zero biases); one shared by an FP16 conv and an FP32-kept op would otherwise
    stay FP32 and leave the conv with mixed input types."""
    inits = {i.name: i for i in model.graph.initializer}
    seen: set[str] = set()
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name not in inits:
                continue
            if name in seen:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[name])
                copy.name = f"{name}__{node.name or node.op_type}_{k}"
                model.graph.initializer.append(copy)
                node.input[k] = copy.name
            else:
                seen.add(name)
    return model


def _save(model: onnx.ModelProto, out_path: str | Path) -> None:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(out_path)
    seal(model)
    try:
        onnx.save(model, str(tmp))
        tmp.replace(out_path)
    finally:
        tmp.unlink(missing_ok=True)


# -- calibration set ---------------------------------------------------------------------------


@dataclass
class CalibrationSet:
    """Preprocessed calibration inputs and the hash that identifies them."""

    inputs: np.ndarray  # (N, 1, S, S) float32, normalised by the model's spec
    digest: str
    description: str
    files: list[str] = field(default_factory=list)


def calibration_files(folder: str | Path, count: int = DEFAULT_CALIBRATION_IMAGES, seed: int = 0) -> list[Path]:
    """A fixed-size subset of the training split when the folder is a labelled dataset (never
    val or test), else of all readable-looking images under it; chosen by name hash."""
    from lungrt.data.datasets import discover_pairs, split_pairs, _files, _unit_hash

    folder = Path(folder)
    if not folder.is_dir():
        raise LungrtError(f"{folder}: calibration folder does not exist")
    pairs = discover_pairs(folder).pairs
    if pairs:
        files = [p.image for p in split_pairs(pairs, seed)["train"]]
    else:
        files = _files(folder)
    if not files:
        raise LungrtError(f"{folder}: no images for calibration")
    files = sorted(files, key=lambda p: _unit_hash(seed, p.name))[:count]
    return sorted(files)


def load_calibration_set(
    spec, folder: str | Path | None, count: int = DEFAULT_CALIBRATION_IMAGES, seed: int = 0
) -> CalibrationSet:
    from lungrt.data.io import read_xray
    from lungrt.data.phantoms import make_phantom

    h = hashlib.sha256(spec.to_json().encode())
    if folder is None:  # no data at hand (demo, tests): synthetic phantoms, said so in the report
        inputs = np.stack([spec.apply(make_phantom(10_000 + i, spec.size).image) for i in range(count)])
        h.update(f"phantoms:{count}".encode())
        return CalibrationSet(inputs, h.hexdigest()[:16], f"{count} synthetic phantoms")
    files = calibration_files(folder, count, seed)
    inputs = np.stack([spec.apply_xray(read_xray(f)) for f in files])
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size};".encode())
    return CalibrationSet(inputs, h.hexdigest()[:16], f"{len(files)} images from {folder}", [str(f) for f in files])


def _calibrator(method: str):
    from onnxruntime.quantization import CalibrationMethod

    if method not in CALIBRATION_METHODS:
        raise LungrtError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    return {
        "entropy": CalibrationMethod.Entropy,
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
    }[method]


class _Reader:
    """onnxruntime CalibrationDataReader over an array. One image per call: the histogram
    collectors (entropy, percentile) stack outputs and fail on a short last batch."""

    def __init__(self, input_name: str, inputs: np.ndarray, batch: int = 1):
        self.batches = [{input_name: inputs[i : i + batch]} for i in range(0, len(inputs), batch)]
        self.pos = 0

    def get_next(self):
        if self.pos >= len(self.batches):
            return None
        self.pos += 1
        return self.batches[self.pos - 1]

    def rewind(self):
        self.pos = 0


def calibration_cache_path(cache_dir: str | Path, weights_hash: str, calib_digest: str, method: str) -> Path:
    return Path(cache_dir) / f"{weights_hash}-{calib_digest}-{method}.json"


def usable_calibration_cache(cache: Path, calibrator) -> bool:
    """True when `cache` holds ranges ONNX Runtime can use for this calibrator. A file cut short
    (crash, full disk) or written for another method is removed, so the ranges are computed again."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    if not cache.is_file():
        return False
    try:
        ok = load_tensors_data(cache).calibration_method == calibrator
    except Exception:  # truncated JSON, or not ONNX Runtime's format at all
        ok = False
    if not ok:
        log_.warning("calibration ranges %s do not parse (or are another method's); computing them again", cache)
        cache.unlink(missing_ok=True)
    return ok


def make_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calib: CalibrationSet,
    method: str = "entropy",
    exclude: list[str] | None = None,
    cache_dir: str | Path | None = None,
) -> dict:
    """Quantize with explicit symmetric Q/DQ (TensorRT's form). Returns what was done, including
    whether the calibration cache was hit."""
    from onnxruntime.quantization import QuantType

    # TensorRT takes biases in float (no int32 DQ); symmetric zero-point-0 INT8 everywhere
    return _ort_qdq(
        fp32_path,
        out_path,
        calib,
        method,
        exclude,
        cache_dir,
        recipe="portable",
        cache_tag=method,
        activations=QuantType.QInt8,
        op_types=INT8_OP_TYPES,
        pre_process=False,
        extra={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
    )


def make_int8_ort_cpu(
    fp32_path: str | Path,
    out_path: str | Path,
    calib: CalibrationSet,
    method: str = "minmax",
    exclude: list[str] | None = None,
    cache_dir: str | Path | None = None,
) -> dict:
    """INT8 for ONNX Runtime's CPU kernels (its documented recommendation for CPUs): the graph
    through `quant_pre_process`, asymmetric UINT8 activations and symmetric per-channel INT8 weights,
    so a ReLU folds into its QuantizeLinear and QLinearConvs chain in NHWC. ConvTranspose has no
    quantized CPU kernel and stays in float."""
    from onnxruntime.quantization import QuantType

    return _ort_qdq(
        fp32_path,
        out_path,
        calib,
        method,
        exclude,
        cache_dir,
        recipe="onnxruntime",
        cache_tag=f"ortcpu-{method}",
        activations=QuantType.QUInt8,
        op_types=ORT_CPU_INT8_OP_TYPES,
        pre_process=True,
        extra={"ActivationSymmetric": False, "WeightSymmetric": True},
    )


def _ort_qdq(
    fp32_path,
    out_path,
    calib: CalibrationSet,
    method: str,
    exclude,
    cache_dir,
    *,
    recipe: str,
    cache_tag: str,
    activations,
    op_types: list[str],
    pre_process: bool,
    extra: dict,
) -> dict:
    """ONNX Runtime's quantize_static in QDQ format, per-channel INT8 weights, calibration ranges
    cached per weights, calibration set and `cache_tag`."""
    from onnxruntime.quantization import QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as _quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from lungrt.core.logs import third_party_logs

    calibrator = _calibrator(method)
    meta = onnx_metadata(fp32_path)
    cache = calibration_cache_path(
        cache_dir or _default_cache_dir(), meta.get("lungrt.weights_hash", "unknown"), calib.digest, cache_tag
    )
    hit = usable_calibration_cache(cache, calibrator)
    with tempfile.TemporaryDirectory() as tmp:
        src, tmp_out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        if pre_process:
            quant_pre_process(str(fp32_path), str(src), skip_symbolic_shape=True)
        else:
            src = Path(fp32_path)
        with third_party_logs(prints="onnxruntime.quantization"):
            _quantize_static(
                str(src),
                str(tmp_out),
                _Reader(onnx.load(str(src)).graph.input[0].name, calib.inputs),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=activations,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=op_types,
                nodes_to_exclude=list(exclude or []),
                calibrate_method=calibrator,
                extra_options=extra,
                calibration_cache_path=str(cache),
            )
        q = onnx.load(str(tmp_out))
    _finish_int8(q, meta, out_path, calib, method, exclude, recipe)
    return {"path": str(out_path), "cache": str(cache), "cache_hit": hit, "excluded": list(exclude or [])}


# OpenVINO's types of the layers INT8 speeds up (Conv, ConvTranspose, MatMul), for the census of
# which of them an IR runs in INT8
OV_INT8_LAYER_TYPES = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul")
# between a layer and its quantizer: NNCF's weight decompression, and data movement a quantizer is
# placed before (it quantizes MaxPool's and Concat's inputs, not their outputs)
_SCALING, _MOVING = (
    {"Multiply", "Subtract"},
    {"Convert", "Reshape", "Transpose", "MaxPool", "Concat", "Squeeze", "Unsqueeze"},
)


def _int8_source(node, depth: int = 6) -> bool:
    """Does this input of a layer come quantized: from a FakeQuantize, or from INT8 weights?"""
    kind = node.get_type_name()
    if kind == "FakeQuantize":
        return True
    if kind == "Constant":
        return node.get_element_type().get_type_name() in ("i8", "u8", "i4", "u4")
    if depth == 0 or kind not in _SCALING | _MOVING:
        return False
    inputs = [node.input_value(i).get_node() for i in range(node.get_input_size())]
    if kind in _SCALING:  # decompression: int8 weights times a float scale
        return any(_int8_source(n, depth - 1) for n in inputs)
    return all(_int8_source(n, depth - 1) for n in (inputs if kind == "Concat" else inputs[:1]))


def float_layers(model) -> list[str]:
    """The INT8-able layers of an OpenVINO model that run in float (an input not quantized)."""
    return [
        op.get_friendly_name()
        for op in model.get_ordered_ops()
        if op.get_type_name() in OV_INT8_LAYER_TYPES
        and not all(_int8_source(op.input_value(i).get_node()) for i in range(op.get_input_size()))
    ]


def nncf_openvino(fp32_path: str | Path, calib: CalibrationSet, preset: str = "performance", validation=None):
    """NNCF INT8 of the OpenVINO model read from the FP32 ONNX file (an `ov.Model`). Preset
    "performance" (symmetric) is the form OpenVINO's INT8 kernels run fastest (the asymmetric "mixed"
    measured 2x slower with AMX). `validation` = (score(compiled model, item indices) -> float,
    number of items, largest allowed drop): NNCF's `quantize_with_accuracy_control` then reverts the
    quantized operations that cost the score most, one at a time, until the drop from the FP32
    model's score is within bounds."""
    from lungrt.export.openvino_ir import openvino_core
    from lungrt.core.logs import third_party_logs

    _, core = openvino_core()
    with third_party_logs("nncf"):
        import nncf

        model = core.read_model(str(fp32_path))
        data = nncf.Dataset([calib.inputs[i : i + 1] for i in range(len(calib.inputs))])
        common = dict(
            preset=nncf.QuantizationPreset(preset), target_device=nncf.TargetDevice.CPU, subset_size=len(calib.inputs)
        )
        if validation is None:
            return nncf.quantize(model, data, **common)
        score, count, max_drop = validation
        return nncf.quantize_with_accuracy_control(
            model,
            data,
            nncf.Dataset(list(range(count))),
            score,
            max_drop=max_drop,
            drop_type=nncf.DropType.ABSOLUTE,
            **common,
        )


def save_int8_ir(model, fp32_path: str | Path, out_path: str | Path, calib: CalibrationSet, reverted=()) -> dict:
    """Save an NNCF-quantized OpenVINO model as a sealed IR carrying the FP32 file's metadata and
    what it was calibrated on; `reverted`: layers the accuracy control put back in float."""
    from lungrt.backends.integrity import load_verified_onnx
    from lungrt.export.openvino_ir import save_sealed_ir

    meta = {k: v for k, v in load_verified_onnx(fp32_path).meta.items() if k != "lungrt.content_hash"}
    floated = float_layers(model)
    census = {
        "int8_layers": sum(op.get_type_name() in OV_INT8_LAYER_TYPES for op in model.get_ordered_ops()) - len(floated),
        "float_layers": floated,
    }
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    save_sealed_ir(
        model,
        {
            **meta,
            "lungrt.export.precision": "int8",
            "lungrt.int8_recipe": "openvino",
            "lungrt.calibration": json.dumps(
                {
                    "method": "nncf",
                    "recipe": "openvino",
                    "set": calib.description,
                    "digest": calib.digest,
                    "excluded_nodes": list(reverted),
                    **census,
                }
            ),
        },
        out_path,
    )
    return census


def make_int8_openvino(
    fp32_path: str | Path,
    out_path: str | Path,
    calib: CalibrationSet,
    method: str = "nncf",
    exclude=None,
    cache_dir=None,
) -> dict:
    """The whole-graph NNCF INT8 IR for OpenVINO (`method` and `exclude` are other recipes': NNCF
    calibrates its own way, and leaves layers in float only through its accuracy control)."""
    return save_int8_ir(nncf_openvino(fp32_path, calib), fp32_path, out_path, calib)


def _finish_int8(
    q: onnx.ModelProto, meta: dict, out_path, calib: CalibrationSet, method: str, exclude, recipe: str
) -> None:
    del q.metadata_props[:]
    set_metadata(
        q,
        {
            **meta,
            "lungrt.export.precision": "int8",
            "lungrt.int8_recipe": recipe,
            "lungrt.calibration": json.dumps(
                {
                    "method": method,
                    "recipe": recipe,
                    "set": calib.description,
                    "digest": calib.digest,
                    "excluded_nodes": list(exclude or []),
                }
            ),
        },
    )
    _save(q, out_path)


def _default_cache_dir() -> Path:
    from lungrt.core.cache import cache_root

    return cache_root() / "calibration"


def quantizable_nodes(fp32_path: str | Path) -> list[str]:
    model = onnx.load(str(fp32_path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type in INT8_OP_TYPES]


def node_block(name: str) -> str:
    """The model block a node belongs to, from the exporter's scoped names:
    '/net/enc.2/enc.2.0/Conv' -> 'enc.2'; '/net/enc_attn.3/attn/q/MatMul' -> 'enc_attn.3'."""
    parts = [p for p in name.split("/") if p]
    if parts and parts[0] == "net":
        parts = parts[1:]
    return parts[0] if len(parts) > 1 else (parts[0] if parts else name)


def variant_path(folder: str | Path, model_name: str, precision: str) -> Path:
    return Path(folder) / f"{model_name}.{precision}.onnx"
