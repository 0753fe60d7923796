"""ONNX export and the precision variants, checked with ONNX Runtime on the CPU."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from lungrt.models.checkpoint import load_checkpoint
from lungrt.cli import app
from lungrt.evaluation.parity import check_export
from lungrt.export.onnx import export_onnx, reference_inputs
from lungrt.export.precision import FP16_KEEP_FP32_OPS, load_calibration_set, make_fp16, make_int8
from lungrt.backends.base import onnx_metadata
from lungrt.backends.onnxruntime import OnnxRuntimeRunner
from lungrt.backends.pytorch import TorchRunner
from lungrt.build.variants import make_variant


@pytest.fixture(scope="module")
def variants(tmp_path_factory, tiny_checkpoint):
    d = tmp_path_factory.mktemp("variants")
    loaded = load_checkpoint(tiny_checkpoint)
    fp32 = export_onnx(loaded, d / "m.fp32.onnx")
    fp16 = make_fp16(fp32, d / "m.fp16.onnx")
    calib = load_calibration_set(loaded.spec, None, count=16)
    int8 = make_int8(fp32, d / "m.int8.onnx", calib, "minmax", cache_dir=d / "cal")
    return {"dir": d, "loaded": loaded, "fp32": fp32, "fp16": fp16, "int8": int8, "calib": calib}


@pytest.mark.parametrize("name", ["unet", "gsconv-unet", "msag-unet"])
def test_export_round_trip_equals_torch_at_other_batch(tmp_path, name):
    from lungrt.models.checkpoint import LoadedModel, ModelInfo
    from lungrt.models import build_model
    from lungrt.core.spec import PreprocessSpec

    loaded = LoadedModel(build_model(name, 4).eval(), ModelInfo(name, 4, PreprocessSpec(size=64)))
    path = export_onnx(loaded, tmp_path / "m.onnx", check_export(loaded))  # raises if ORT and torch differ
    m = onnx.load(str(path))
    assert m.opset_import[0].version >= 17
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = reference_inputs(loaded.spec, 5, seed=3)
    with OnnxRuntimeRunner(path) as r:
        assert r.sleeps_when_idle  # no spinning on the CPU: infer may run its helpers at idle priority
        assert np.abs(r.run(x) - TorchRunner(loaded).run(x)).max() < 1e-4


def test_metadata_survives(variants):
    meta = onnx_metadata(variants["fp32"])
    info = json.loads(meta["lungrt.model"])
    assert info["name"] == "unet" and info["preprocess"] == variants["loaded"].spec.to_dict()
    with OnnxRuntimeRunner(variants["int8"]["path"]) as r:  # spec survives quantization too
        assert r.spec == variants["loaded"].spec and r.precision == "int8"


def test_fp16_graph_has_fp32_io_and_keeps_sensitive_ops_fp32(tmp_path):
    from lungrt.models.checkpoint import LoadedModel, ModelInfo
    from lungrt.models import build_model
    from lungrt.core.spec import PreprocessSpec

    loaded = LoadedModel(build_model("msag-unet", 4).eval(), ModelInfo("msag-unet", 4, PreprocessSpec(size=64)))
    fp16 = make_fp16(export_onnx(loaded, tmp_path / "a.onnx"), tmp_path / "a16.onnx")
    m = onnx.shape_inference.infer_shapes(onnx.load(str(fp16)))
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert m.graph.input[0].type.tensor_type.elem_type == f32
    assert m.graph.output[0].type.tensor_type.elem_type == f32
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output)
    }
    inits = {i.name: i.data_type for i in m.graph.initializer}
    kept = [n for n in m.graph.node if n.op_type in FP16_KEEP_FP32_OPS]
    assert {n.op_type for n in kept} >= {"Softmax", "LayerNormalization"}
    for n in kept:
        for t in list(n.input[:1]) + list(n.output[:1]):
            assert types.get(t, inits.get(t)) == f32, (n.op_type, t)
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    assert convs and all(inits[n.input[1]] == f16 for n in convs)  # weights really are FP16
    x = reference_inputs(loaded.spec, 2)
    with OnnxRuntimeRunner(fp16) as r:
        assert np.abs(r.run(x) - TorchRunner(loaded).run(x)).max() < 5e-3


def test_int8_has_symmetric_per_channel_qdq(variants):
    m = onnx.load(variants["int8"]["path"])
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    q = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert q and dq
    for n in q + dq:  # symmetric INT8: zero points are int8 zeros
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any()
    for conv in (n for n in m.graph.node if n.op_type == "Conv"):
        w_dq = next(d for d in dq if d.output[0] == conv.input[1])
        assert inits[w_dq.input[0]].dtype == np.int8
        assert inits[w_dq.input[1]].size == inits[w_dq.input[0]].shape[0]  # one scale per output channel


def test_calibration_cache_is_reused(variants):
    d, calib = variants["dir"], variants["calib"]
    again = make_int8(variants["fp32"], d / "again.onnx", calib, "minmax", cache_dir=d / "cal")
    assert variants["int8"]["cache_hit"] is False and again["cache_hit"] is True
    assert again["cache"] == variants["int8"]["cache"]
    a, b = onnx.load(variants["int8"]["path"]), onnx.load(str(d / "again.onnx"))
    sa = {i.name: onnx.numpy_helper.to_array(i).tobytes() for i in a.graph.initializer}
    sb = {i.name: onnx.numpy_helper.to_array(i).tobytes() for i in b.graph.initializer}
    assert sa == sb  # reproducible from the cache


def test_variants_are_made_once(tmp_path, tiny_checkpoint):
    loaded = load_checkpoint(tiny_checkpoint)
    v1 = make_variant(loaded, "fp16", folder=tmp_path)
    mtime = v1.path.stat().st_mtime_ns
    v2 = make_variant(loaded, "fp16", folder=tmp_path)
    assert v2.path == v1.path and v2.path.stat().st_mtime_ns == mtime


def _parity(*args):
    return CliRunner().invoke(app, ["parity", *args])


def test_parity_passes_for_good_variants_and_fails_for_a_broken_one(tmp_path, tiny_checkpoint, phantom_dir, variants):
    common = ["--model", str(tiny_checkpoint), "--data", str(phantom_dir), "--split", "all"]
    ok = _parity(*common, "--variant", "fp32", "--onnx", str(variants["fp32"]), "--json", str(tmp_path / "p.json"))
    assert ok.exit_code == 0, ok.output
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["gate"]["passed"] and report["summary"]["mask_agreement"] >= 0.9999
    fp16 = _parity(*common, "--variant", "fp16", "--onnx", str(variants["fp16"]))
    assert fp16.exit_code == 0, fp16.output
    # deliberately broken: perturb one conv's weights in the FP32 graph
    m = onnx.load(str(variants["fp32"]))
    w = next(i for i in m.graph.initializer if i.dims and len(i.dims) == 4)
    arr = onnx.numpy_helper.to_array(w).copy()
    arr *= -1.5
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    onnx.save(m, str(tmp_path / "edited.onnx"))
    edited = _parity(*common, "--variant", "fp32", "--onnx", str(tmp_path / "edited.onnx"))
    assert edited.exit_code == 2 and "content hash" in " ".join(edited.output.split())  # edited: never run
    from lungrt.backends.integrity import seal

    seal(m)  # as if lungrt itself had written wrong weights: it runs, and the gate catches it
    onnx.save(m, str(tmp_path / "broken.onnx"))
    bad = _parity(*common, "--variant", "fp32", "--onnx", str(tmp_path / "broken.onnx"))
    assert bad.exit_code == 1, bad.output
    assert "FAIL" in bad.output


def test_int8_exclusion_search_leaves_sensitive_blocks_in_float(tmp_path, tiny_checkpoint, phantom_dir, monkeypatch):
    """With a gate that full INT8 cannot meet, the search must exclude blocks (worst first) until
    the variant passes, and record them in the ONNX metadata."""
    from lungrt.evaluation import parity
    from lungrt.build import variants as variants_mod
    from lungrt.data.datasets import discover_pairs

    from tests.conftest import gate_forcing_a_search

    loaded = load_checkpoint(tiny_checkpoint)
    pairs = discover_pairs(phantom_dir).pairs[:6]
    gate = gate_forcing_a_search(loaded, pairs, "portable", tmp_path / "probe", method="minmax")
    monkeypatch.setitem(parity.GATES, "int8", gate)
    v = variants_mod.make_variant(
        loaded,
        "int8",
        folder=tmp_path,
        method="minmax",
        val_pairs=pairs,
        cache_dir=tmp_path / "cal",
        log=lambda *a: None,
    )
    excluded = v.notes["excluded_blocks"]
    assert excluded, "a gate full INT8 misses must exclude something"
    meta = json.loads(onnx_metadata(v.path)["lungrt.calibration"])
    assert meta["excluded_nodes"] and all(any(f"/{b}/" in n for b in excluded) for n in meta["excluded_nodes"])
    with OnnxRuntimeRunner(v.path) as cand:
        from lungrt.evaluation.parity import apply_gate, compare

        assert apply_gate(compare(TorchRunner(loaded), cand, pairs)["summary"], parity.GATES["int8"])["passed"]


def test_fp16_of_gsconv_loads_in_onnxruntime(tmp_path):
    """Attention gates' Resize and the ASPP pooling stay FP32 behind casts; the graph must stay valid."""
    from lungrt.models.checkpoint import LoadedModel, ModelInfo
    from lungrt.models import build_model
    from lungrt.core.spec import PreprocessSpec

    loaded = LoadedModel(build_model("gsconv-unet", 4).eval(), ModelInfo("gsconv-unet", 4, PreprocessSpec(size=64)))
    fp16 = make_fp16(export_onnx(loaded, tmp_path / "g.onnx"), tmp_path / "g16.onnx")
    x = reference_inputs(loaded.spec, 2)
    with OnnxRuntimeRunner(fp16) as r:
        assert np.abs(r.run(x) - TorchRunner(loaded).run(x)).max() < 5e-3


def test_gated_convs_export_as_separate_convs_without_split(tmp_path):
    """GSConv's fused feature+gate conv is split into two convs in the graph: a channel Split of a
    conv output crosses the CPU plugins' 16-channel blocks (OpenVINO ran it with reference kernels,
    half of gsconv-unet's time). Same arithmetic per channel, so outputs must not move."""
    from lungrt.models.checkpoint import LoadedModel, ModelInfo
    from lungrt.models import build_model
    from lungrt.core.spec import PreprocessSpec

    loaded = LoadedModel(build_model("gsconv-unet", 4).eval(), ModelInfo("gsconv-unet", 4, PreprocessSpec(size=64)))
    path = export_onnx(loaded, tmp_path / "g.onnx")
    g = onnx.load(str(path)).graph
    producers = {o: n.op_type for n in g.node for o in n.output}
    assert not [n for n in g.node if n.op_type == "Split" and producers.get(n.input[0]) == "Conv"]
    assert len([n for n in g.node if n.name.endswith("__part1")]) == 18  # 9 gated double convs x 2
    x = reference_inputs(loaded.spec, 3)
    with OnnxRuntimeRunner(path) as r:
        assert np.abs(r.run(x) - TorchRunner(loaded).run(x)).max() < 1e-5
