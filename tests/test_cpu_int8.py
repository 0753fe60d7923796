"""CPU INT8 that each engine runs as intended (ONNX Runtime's asymmetric Q/DQ, NNCF for OpenVINO),
gated by the runner that executes it, and `build --backend cpu --precision auto` choosing among
the CPU engines and handing its choice to infer."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from lungrt.backends.base import onnx_metadata
from lungrt.backends.onnxruntime import OnnxRuntimeRunner
from lungrt.backends.pytorch import TorchRunner
from lungrt.cli import app
from lungrt.core.errors import LungrtError
from lungrt.core.hardware import cpu_flags
from lungrt.data.datasets import discover_pairs
from lungrt.evaluation import parity
from lungrt.build import variants as variants_mod
from lungrt.export.onnx import reference_inputs
from lungrt.models.checkpoint import load_checkpoint

from tests.conftest import gate_forcing_a_search

pytest.importorskip("openvino")
pytest.importorskip("nncf")
runner = CliRunner()


def another_cap() -> str:
    """A oneDNN cap other than the one this process may already run under (tests/test_cpu_caps.py)."""
    import os

    return "SSE41" if os.environ.get("ONEDNN_MAX_CPU_ISA") == "AVX2" else "AVX2"


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def test_onnxruntime_int8_is_asymmetric_uint8_with_float_conv_transpose(tmp_path, tiny_checkpoint, phantom_dir):
    loaded = load_checkpoint(tiny_checkpoint)
    v = variants_mod.make_variant(
        loaded,
        "int8",
        folder=tmp_path,
        calib_dir=phantom_dir,
        method="minmax",
        cache_dir=tmp_path,
        target="onnxruntime",
        log=lambda *a: None,
    )
    assert ".int8-ortcpu-minmax-" in v.path.name and v.notes["recipe"] == "onnxruntime"
    m = onnx.load(str(v.path))
    quant = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    zero_points = [_initializer(m, n.input[2]) for n in quant]
    assert zero_points and all(z.dtype == np.uint8 for z in zero_points)
    assert any(int(z) != 0 for z in zero_points), "asymmetric activations: some zero point is not 0"
    producers = {o: n.op_type for n in m.graph.node for o in n.output}
    convt = [n for n in m.graph.node if n.op_type == "ConvTranspose"]
    assert convt and all(producers.get(n.input[1]) != "DequantizeLinear" for n in convt)  # float weights
    x = reference_inputs(loaded.spec, 4)
    with OnnxRuntimeRunner(v.path) as r:
        assert r.precision == "int8"
        agree = ((r.run(x) > 0.5) == (TorchRunner(loaded).run(x) > 0.5)).mean()
    # ONNX Runtime's u8*s8 kernels are exact with VNNI/AMX; pre-VNNI AVX2 ones can saturate, so what
    # they compute is only asserted where the CPU has the instructions (the gate handles the rest)
    if {"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu_flags()):
        assert agree > 0.98


def test_openvino_int8_is_an_nncf_ir_gated_on_openvino(tmp_path, tiny_checkpoint, phantom_dir):
    from lungrt.backends.integrity import load_verified
    from lungrt.backends.openvino import OpenVinoRunner

    loaded = load_checkpoint(tiny_checkpoint)
    pairs = discover_pairs(phantom_dir).pairs[:6]
    v = variants_mod.make_variant(
        loaded,
        "int8",
        folder=tmp_path,
        calib_dir=phantom_dir,
        val_pairs=pairs,
        cache_dir=tmp_path,
        target="openvino",
        log=lambda *a: None,
    )
    assert v.path.suffix == ".xml" and v.path.with_suffix(".bin").is_file() and ".int8-nncf-" in v.path.name
    assert v.notes["recipe"] == "openvino" and v.notes["method"] == "nncf"
    meta = load_verified(v.path).meta
    assert meta["lungrt.int8_recipe"] == "openvino" and json.loads(meta["lungrt.model"])["name"] == "unet"
    import openvino as ov

    model = ov.Core().read_model(str(v.path))
    fake_quantizes = sum(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops())
    # INT8 where the gate allows it: the census in the notes is what the graph holds
    assert v.notes["int8_layers"] + len(v.notes["float_layers"]) == len(
        [
            op
            for op in model.get_ordered_ops()
            if op.get_type_name() in ("Convolution", "ConvolutionBackpropData", "MatMul")
        ]
    )
    assert (fake_quantizes > 0) == (v.notes["int8_layers"] > 0)
    with OpenVinoRunner(v.path) as r:
        assert r.describe() == "openvino/cpu/int8"
        summary = parity.compare(TorchRunner(loaded), r, pairs)["summary"]
    assert parity.apply_gate(summary, parity.GATES["int8"])["passed"]


def test_openvino_accuracy_control_reverts_layers_until_the_gate_passes(
    tmp_path, tiny_checkpoint, phantom_dir, monkeypatch
):
    """A gate whole-graph INT8 misses on this CPU (FAKE: set between what INT8 and FP32 reach here):
    NNCF's accuracy control, scored by lungrt's gate on OpenVINO, puts layers back in float until
    the IR passes; every verdict is OpenVINO's, and PyTorch FP32 runs once for all of them."""
    used, torch_runs = [], []
    real_summary, real_run = variants_mod._gate_summary, TorchRunner.run

    def spy(loaded, path, pairs, open_runner=OnnxRuntimeRunner):
        used.append(open_runner)
        return real_summary(loaded, path, pairs, open_runner)

    def counting_run(self, batch):
        torch_runs.append(len(batch))
        return real_run(self, batch)

    loaded = load_checkpoint(tiny_checkpoint)
    pairs = discover_pairs(phantom_dir).pairs[:6]
    gate = gate_forcing_a_search(loaded, pairs, "openvino", tmp_path / "probe", phantom_dir)
    variants_mod.make_variant(loaded, "fp32", folder=tmp_path)  # its export check runs PyTorch too
    monkeypatch.setitem(parity.GATES, "int8", gate)
    monkeypatch.setattr(variants_mod, "_gate_summary", spy)
    monkeypatch.setattr(TorchRunner, "run", counting_run)
    parity._REFERENCE_CACHE.clear()
    lines = []
    v = variants_mod.make_variant(
        loaded,
        "int8",
        folder=tmp_path,
        calib_dir=phantom_dir,
        val_pairs=pairs,
        cache_dir=tmp_path,
        target="openvino",
        log=lines.append,
    )
    assert any("accuracy control" in line for line in lines)
    assert v.notes["excluded_layers"] and set(v.notes["excluded_layers"]) <= set(v.notes["float_layers"])
    assert len(used) == 2 and all(u is variants_mod.INT8_RECIPES["openvino"].open for u in used)  # whole, then result
    assert sum(torch_runs) == len(pairs)  # one reference pass for every score and gate
    from lungrt.backends.openvino import OpenVinoRunner

    with OpenVinoRunner(v.path) as r:  # the file left behind is the one that passed
        assert parity.apply_gate(parity.compare(TorchRunner(loaded), r, pairs)["summary"], gate)["passed"]


def test_a_cached_int8_made_without_a_gate_is_gated_before_a_gated_request_gets_it(
    tmp_path, tiny_checkpoint, phantom_dir, monkeypatch
):
    """`lungrt bench --calib` and the build ask for a gated INT8; a file of the same name cached by an
    ungated call must not be handed out as gated: it is gated once, then remembered by content."""
    gated = []
    real = variants_mod._gate_summary

    def spy(loaded, path, pairs, open_runner=OnnxRuntimeRunner):
        gated.append(path.name)
        return real(loaded, path, pairs, open_runner)

    loaded = load_checkpoint(tiny_checkpoint)
    pairs = discover_pairs(phantom_dir).pairs[:4]
    kw = dict(folder=tmp_path, calib_dir=phantom_dir, cache_dir=tmp_path, target="onnxruntime", log=lambda *a: None)
    ungated = variants_mod.make_variant(loaded, "int8", **kw)
    monkeypatch.setattr(variants_mod, "_gate_summary", spy)
    # FAKE gates throughout: whether ONNX Runtime's INT8 passes the real one depends on the CPU's kernels
    monkeypatch.setitem(parity.GATES, "int8", parity.Gate(0.0, None))
    assert variants_mod.make_variant(loaded, "int8", val_pairs=pairs, **kw).path == ungated.path
    assert gated == [ungated.path.name]  # gated now, not trusted
    checked = []
    real_load = variants_mod.load_verified
    monkeypatch.setattr(variants_mod, "load_verified", lambda p: checked.append(Path(p).name) or real_load(p))
    variants_mod.make_variant(loaded, "int8", val_pairs=pairs, **kw)
    assert len(gated) == 1  # this file passed this gate on these images: remembered
    assert checked.count(ungated.path.name) == 1  # checked by content once for the request, not per step
    monkeypatch.setitem(parity.GATES, "int8", parity.Gate(1.01, None))  # FAKE: a gate nothing passes
    with pytest.raises(LungrtError, match="cannot pass its gate"):
        variants_mod.make_variant(loaded, "int8", val_pairs=pairs, **kw)
    assert not ungated.path.exists()  # failed the new gate: not left for reuse


def test_a_truncated_calibration_cache_is_computed_again(tmp_path, tiny_checkpoint, phantom_dir, caplog):
    loaded = load_checkpoint(tiny_checkpoint)
    kw = dict(
        calib_dir=phantom_dir, method="minmax", cache_dir=tmp_path / "cal", target="onnxruntime", log=lambda *a: None
    )
    first = variants_mod.make_variant(loaded, "int8", folder=tmp_path / "a", **kw)
    (cache,) = (tmp_path / "cal").glob("*-ortcpu-minmax.json")
    whole = cache.read_bytes()
    cache.write_bytes(whole[: len(whole) // 2])  # cut short, as a crash or a full disk leaves it
    with caplog.at_level("WARNING", logger="lungrt"):
        again = variants_mod.make_variant(loaded, "int8", folder=tmp_path / "b", **kw)
    assert [r for r in caplog.records if "do not parse" in r.getMessage()]
    assert json.loads(cache.read_text()) == json.loads(whole)  # the ranges were computed again, the same
    assert load_verified(first.path) == load_verified(again.path)


def load_verified(path):
    from lungrt.backends.integrity import load_verified_onnx

    return load_verified_onnx(path).content_hash


def test_variants_from_an_older_exporter_are_made_again(tmp_path, tiny_checkpoint):
    loaded = load_checkpoint(tiny_checkpoint)
    path = variants_mod.make_variant(loaded, "fp32", folder=tmp_path).path
    m = onnx.load(str(path))
    for p in m.metadata_props:
        if p.key == "lungrt.export.revision":
            p.value = "1"
    onnx.save(m, str(path))
    again = variants_mod.make_variant(loaded, "fp32", folder=tmp_path).path
    assert onnx_metadata(again)["lungrt.export.revision"] == variants_mod.EXPORT_REVISION


def test_choice_among_equally_fast_candidates_is_the_most_faithful():
    from lungrt.build import fastest_faithful

    def cand(name, speed, agreement):
        return {"name": name, "img_per_s": speed, "parity": {"mask_agreement": agreement}}

    bf16, int8, fp32 = cand("bf16", 87.6, 0.99984), cand("int8", 91.7, 0.99797), cand("fp32", 31.9, 1.0)
    assert fastest_faithful([fp32, bf16, int8])["name"] == "bf16"  # 4.5% slower: the same speed here
    int8["img_per_s"] = 99.0  # bf16 11.5% slower: a real gain
    assert fastest_faithful([fp32, bf16, int8])["name"] == "int8"
    assert fastest_faithful([fp32])["name"] == "fp32"


THIRD_PARTY_CHATTER = (
    "INFO:nncf",
    "Statistics collection",
    "Fast Bias correction",
    "Collecting tensor data",
    "Finding optimal threshold",
    "[I] ",
)  # INFO: warnings may still be said


def assert_quiet(*texts: str) -> None:
    noise = [line for t in texts for line in t.splitlines() if any(c in line for c in THIRD_PARTY_CHATTER)]
    assert not noise, noise[:5]


def test_build_cpu_auto_records_the_fastest_passing_choice_and_infer_uses_it(
    tmp_path, tiny_checkpoint, phantom_dir, monkeypatch, capfd
):
    from lungrt.build import resolve as select

    monkeypatch.chdir(tmp_path)
    res = runner.invoke(
        app,
        [
            "build",
            "--model",
            str(tiny_checkpoint),
            "--backend",
            "cpu",
            "--precision",
            "auto",
            "--data",
            str(phantom_dir),
            "--calib",
            str(phantom_dir),
            "--method",
            "entropy",
            "--out",
            "b",
        ],
    )
    assert res.exit_code == 0, res.output
    assert_quiet(res.output, *capfd.readouterr())  # NNCF, ONNX Runtime's calibration: nothing on the terminal
    report = json.loads((tmp_path / "b" / "unet-auto-cpu.json").read_text())
    from lungrt.backends.openvino import native_bf16

    by = {(c["backend"], c["precision"]): c for c in report["candidates"]}
    if not native_bf16():  # no AVX-512 BF16 / AMX here, or oneDNN capped below them (tests/test_cpu_caps.py)
        assert "no native bf16" in by[("openvino", "bf16")]["skipped"]
    timed = [c for c in report["candidates"] if "img_per_s" in c]
    assert {(c["backend"], c["precision"]) for c in timed} >= {
        ("onnxruntime", "fp32"),
        ("openvino", "fp32"),
        ("onnxruntime", "int8"),
        ("openvino", "int8"),
    }
    passing = [c for c in timed if c["gate"]["passed"]]
    top = max(c["img_per_s"] for c in passing)
    # the rule: the fastest, or within 10 % of it the most faithful (equal agreement: the faster)
    best = max(
        (c for c in passing if c["img_per_s"] >= 0.90 * top),
        key=lambda c: (c["parity"]["mask_agreement"], c["img_per_s"]),
    )
    assert report["choice"] == f"{best['backend']} {best['precision']}"
    record = select.cpu_choice_file(load_checkpoint(tiny_checkpoint))
    recorded = json.loads(record.read_text())
    assert recorded["path"] == str(Path(best["path"]).resolve())
    assert (
        recorded["mask_agreement"] == best["parity"]["mask_agreement"]
        and recorded["gate_images"] == report["validation_images"]
    )
    from lungrt.core.hardware import cpu_identity

    assert recorded["hardware"] == cpu_identity() and recorded["content_hash"] == best["runner"]["content_hash"]

    out = tmp_path / "masks"
    monkeypatch.chdir(tmp_path / "b")  # the record must work from any folder
    res = runner.invoke(app, ["infer", str(phantom_dir / "images"), "--out", str(out), "--model", str(tiny_checkpoint)])
    assert res.exit_code == 0, res.output
    with open(out / "results.csv") as f:
        backends = {r["backend"] for r in csv.DictReader(f)}
    assert backends == {f"{best['backend']}/cpu/{best['precision']}"}

    # a choice made on another CPU (here: a capped instruction set) lives beside it, and is not used here
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", another_cap())
    assert select.cpu_choice_file(load_checkpoint(tiny_checkpoint)) != record
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    data = json.loads(record.read_text())
    data["hardware"]["cpu"] = "some other CPU"
    record.write_text(json.dumps(data))
    loaded = load_checkpoint(tiny_checkpoint)
    assert select.open_recorded_cpu_choice(loaded, log=lambda *a: None) is None


def test_infer_refuses_an_int8_it_would_have_to_make_ungated(tmp_path, tiny_checkpoint, phantom_dir):
    res = runner.invoke(
        app,
        [
            "infer",
            str(phantom_dir / "images"),
            "--out",
            str(tmp_path / "o"),
            "--model",
            str(tiny_checkpoint),
            "--backend",
            "openvino",
            "--precision",
            "int8",
        ],
    )
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "calibration set and a parity gate" in text and "Traceback" not in text
    assert not (tmp_path / "o" / "results.csv").exists()


def test_cpu_int8_is_remade_and_regated_on_another_cpu(tmp_path, tiny_checkpoint, phantom_dir, monkeypatch):
    """A cache shared by servers with other CPUs (or a capped instruction set) must not hand one
    CPU's gated INT8 to another: OpenVINO's INT8 kernels differ by instruction set."""
    loaded = load_checkpoint(tiny_checkpoint)
    kw = dict(folder=tmp_path, calib_dir=phantom_dir, cache_dir=tmp_path, target="openvino", log=lambda *a: None)
    here = variants_mod.make_variant(loaded, "int8", **kw).path
    assert variants_mod.make_variant(loaded, "int8", **kw).path == here
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", another_cap())
    other = variants_mod.make_variant(loaded, "int8", **kw).path
    assert other != here and other.exists() and here.exists()


def test_demo_explains_a_recorded_choice_that_misses_its_gate_on_phantoms(tiny_checkpoint):
    from lungrt.build import resolve as select
    from lungrt.demo import recorded_choice_note

    class FakeRunner:  # glue only: what the demo ran on
        def __init__(self, described):
            self.described = described

        def describe(self):
            return self.described

    loaded = load_checkpoint(tiny_checkpoint)
    select.record_cpu_choice(
        loaded,
        {
            "backend": "openvino",
            "precision": "int8",
            "path": str(tiny_checkpoint),
            "img_per_s": 300.0,
            "mask_agreement": 0.99855,
            "gate_images": 48,
            "gate_data": "DATA",
        },
    )
    failed, passed = {"passed": False}, {"passed": True}
    note = recorded_choice_note(loaded, FakeRunner("openvino/cpu/int8"), failed)
    assert "0.99855 on 48 images from DATA" in note and "--backend openvino --variant int8" in note
    assert recorded_choice_note(loaded, FakeRunner("openvino/cpu/int8"), passed) is None
    assert recorded_choice_note(loaded, FakeRunner("onnxruntime/cpu/fp32"), failed) is None  # not the recorded one


def test_a_cpu_choice_gated_only_on_phantoms_is_never_recorded(tmp_path, tiny_checkpoint, monkeypatch):
    """Without --data the gate runs on drawings: every gate line says so, and the choice is not what infer will use."""
    from lungrt.build import resolve as select

    monkeypatch.chdir(tmp_path)
    record = select.cpu_choice_file(load_checkpoint(tiny_checkpoint))
    before = record.read_bytes() if record.exists() else None  # another test may have recorded one with --data
    res = runner.invoke(
        app, ["build", "--model", str(tiny_checkpoint), "--backend", "cpu", "--precision", "auto", "--out", "b"]
    )
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    gate_lines = [line for line in res.output.splitlines() if line.startswith("candidate") and "agreement" in line]
    assert gate_lines and all("16 synthetic phantoms" in line for line in gate_lines), gate_lines
    assert "not recorded for infer: gated on synthetic phantoms only" in text
    assert (record.read_bytes() if record.exists() else None) == before


def test_the_int8_search_says_each_step_and_stops_at_its_bound():
    from lungrt.core.errors import LungrtError
    from lungrt.build.variants import SearchBound

    said = []
    bound = SearchBound("INT8 block search", minutes=0.0005, log=said.append)  # 30 ms
    bound.step(" (1 operations in float)")
    assert said and "step 1 (1 operations in float)" in said[0] and "left" in said[0]
    import time

    time.sleep(0.05)
    with pytest.raises(LungrtError, match="stopped at its bound .* after 1 steps"):
        bound.step()
