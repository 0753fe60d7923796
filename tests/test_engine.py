"""TensorRT layer. Glue is tested here with a recording FAKE builder (named as such: it is not
TensorRT coverage). Real TensorRT tests are marked `tensorrt` and skip where it does not import."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lungrt.checkpoint import load_checkpoint
from lungrt.cli import app
from lungrt.doctor import tensorrt_status
from lungrt.engine import BatchProfile, build_engine, check_plan_usable, export_triton, metadata_path
from lungrt.errors import LungrtError
from lungrt.variants import make_variant

TRT_OK, TRT_WHY = tensorrt_status()
needs_tensorrt = pytest.mark.skipif(not TRT_OK, reason=f"TensorRT not usable here: {TRT_WHY}")


class RecordingFakeBuilder:
    """FAKE TensorRT builder: records what lungrt asks for and returns placeholder bytes."""

    def __init__(self, env=None):
        self.env = env or {"tensorrt": "10.99.0", "gpu": "FAKE GPU", "compute_capability": "9.0"}
        self.calls: list[dict] = []

    def environment(self):
        return dict(self.env)

    def build(self, onnx_path, **kwargs):
        self.calls.append({"onnx": Path(onnx_path), **kwargs})
        kwargs["timing_cache"].write_bytes(b"fake timing cache")
        return b"FAKE-PLAN-" + Path(onnx_path).name.encode()


@pytest.fixture(scope="module")
def fp16_onnx(tmp_path_factory, tiny_checkpoint):
    return make_variant(load_checkpoint(tiny_checkpoint), "fp16", folder=tmp_path_factory.mktemp("v")).path


def test_builder_is_asked_for_a_strongly_typed_profiled_build(tmp_path, fp16_onnx):
    fake = RecordingFakeBuilder()
    meta = build_engine(fp16_onnx, tmp_path, BatchProfile(2, 4, 8), workspace_gib=1.5, builder=fake, log=lambda *a: None)
    (call,) = fake.calls
    assert call["strongly_typed"] is True
    assert call["input_name"] == "image"
    assert call["shapes"] == {"min": (2, 1, 64, 64), "opt": (4, 1, 64, 64), "max": (8, 1, 64, 64)}
    assert call["timing_cache"] == tmp_path / "timing.cache"
    assert call["workspace_bytes"] == int(1.5 * 2**30)
    plan = tmp_path / (fp16_onnx.name.removesuffix(".onnx") + ".plan")
    assert plan.read_bytes().startswith(b"FAKE-PLAN-")
    saved = json.loads(metadata_path(plan).read_text())
    assert saved == meta
    for key in ("onnx_hash", "weights_hash", "precision", "tensorrt", "gpu", "compute_capability", "batch_profile",
                "input", "output", "calibration", "lungrt_version", "built_at", "model"):
        assert key in saved, key
    assert saved["precision"] == "fp16" and saved["batch_profile"] == [2, 4, 8]


def test_up_to_date_engine_is_a_no_op_and_timing_cache_is_reused(tmp_path, fp16_onnx):
    fake = RecordingFakeBuilder()
    build_engine(fp16_onnx, tmp_path, builder=fake, log=lambda *a: None)
    build_engine(fp16_onnx, tmp_path, builder=fake, log=lambda *a: None)
    assert len(fake.calls) == 1  # second build: nothing to do
    other = RecordingFakeBuilder({**fake.env, "tensorrt": "11.0.0"})
    build_engine(fp16_onnx, tmp_path, builder=other, log=lambda *a: None)
    assert len(other.calls) == 1  # new TensorRT: rebuilt, with the persisted timing cache offered
    assert other.calls[0]["timing_cache"].read_bytes() == b"fake timing cache"
    build_engine(fp16_onnx, tmp_path, builder=other, rebuild=True, log=lambda *a: None)
    assert len(other.calls) == 2


@pytest.mark.parametrize("change, needle", [({"gpu": "Other GPU"}, "GPU"), ({"tensorrt": "9.0"}, "TensorRT version"),
                                            ({"compute_capability": "8.6"}, "compute capability")])
def test_stale_engines_are_refused_with_rebuild_advice(tmp_path, fp16_onnx, change, needle):
    fake = RecordingFakeBuilder()
    build_engine(fp16_onnx, tmp_path, builder=fake, log=lambda *a: None)
    plan = next(tmp_path.glob("*.plan"))
    check_plan_usable(plan, fake.environment())  # same environment: fine
    with pytest.raises(LungrtError) as e:
        check_plan_usable(plan, {**fake.environment(), **change})
    assert needle in str(e.value) and "lungrt build" in str(e.value) and "--rebuild-stale" in str(e.value)


def test_changed_onnx_makes_engine_stale(tmp_path, fp16_onnx):
    import shutil

    onnx_copy = tmp_path / fp16_onnx.name
    shutil.copyfile(fp16_onnx, onnx_copy)
    fake = RecordingFakeBuilder()
    build_engine(onnx_copy, tmp_path, builder=fake, log=lambda *a: None)
    with open(onnx_copy, "ab") as f:
        f.write(b"\0")
    with pytest.raises(LungrtError, match="ONNX file it was built from has changed"):
        check_plan_usable(next(tmp_path.glob("*.plan")), fake.environment())


def parse_pbtxt(text: str) -> dict:
    """A small protobuf-text parser for the config (repeated keys become lists)."""
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,]+', text)
    pos = 0

    def value():
        nonlocal pos
        t = tokens[pos]
        pos += 1
        if t == "{":
            return block("}")
        if t == "[":
            items = []
            while tokens[pos] != "]":
                if tokens[pos] == ",":
                    pos += 1
                    continue
                items.append(value())
            pos += 1
            return items
        if t.startswith('"'):
            return json.loads(t)
        return int(t) if re.fullmatch(r"-?\d+", t) else t

    def block(end):
        nonlocal pos
        out: dict = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            if tokens[pos] == ":":
                pos += 1
            v = value()
            out.setdefault(key, []).append(v)
        pos += 1
        return {k: v[0] if len(v) == 1 else v for k, v in out.items()}

    return block(None)


def test_triton_repository_config_parses_back(tmp_path, fp16_onnx):
    build_engine(fp16_onnx, tmp_path / "eng", BatchProfile(1, 8, 32), builder=RecordingFakeBuilder(), log=lambda *a: None)
    plan = next((tmp_path / "eng").glob("*.plan"))
    res = CliRunner().invoke(app, ["package", "--engine", str(plan), "--triton", str(tmp_path / "repo"), "--name", "lungs"])
    assert res.exit_code == 0, res.output
    cfg = parse_pbtxt((tmp_path / "repo" / "lungs" / "config.pbtxt").read_text())
    assert (tmp_path / "repo" / "lungs" / "1" / "model.plan").read_bytes() == plan.read_bytes()
    assert cfg["name"] == "lungs" and cfg["platform"] == "tensorrt_plan" and cfg["max_batch_size"] == 32
    (inp,), (outp,) = cfg["input"], cfg["output"]
    assert inp == {"name": "image", "data_type": "TYPE_FP32", "dims": [1, 64, 64]}
    assert outp == {"name": "probability", "data_type": "TYPE_FP32", "dims": [1, 64, 64]}
    assert cfg["dynamic_batching"]["preferred_batch_size"] == [8, 32]
    assert cfg["instance_group"][0]["kind"] == "KIND_GPU"
    spec = json.loads(cfg["parameters"]["value"]["string_value"])
    assert spec["size"] == 64


def test_package_without_metadata_is_one_line_error(tmp_path):
    (tmp_path / "x.plan").write_bytes(b"x")
    res = CliRunner().invoke(app, ["package", "--engine", str(tmp_path / "x.plan"), "--triton", str(tmp_path / "r")])
    assert res.exit_code == 2 and "x.plan" in res.output


@pytest.mark.skipif(TRT_OK, reason="checks the behaviour without TensorRT")
def test_without_tensorrt_auto_falls_back_and_tensorrt_fails_clearly(tmp_path, tiny_checkpoint):
    r = CliRunner()
    res = r.invoke(app, ["build", "--model", str(tiny_checkpoint), "--precision", "fp32", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "building the ONNX Runtime variant instead" in res.output
    assert list(tmp_path.glob("*.fp32.onnx"))
    res = r.invoke(app, ["build", "--model", str(tiny_checkpoint), "--backend", "tensorrt", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "lungrt[trt]" in res.output


def test_precision_auto_on_onnxruntime_picks_a_passing_variant(tmp_path, tiny_checkpoint, phantom_dir):
    res = CliRunner().invoke(app, ["build", "--model", str(tiny_checkpoint), "--precision", "auto", "--backend", "onnxruntime",
                                   "--data", str(phantom_dir), "--calib", str(phantom_dir), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "unet-auto.json").read_text())
    assert {c["precision"] for c in report["candidates"]} == {"fp32", "fp16", "int8"}
    chosen = next(c for c in report["candidates"] if c["precision"] == report["choice"])
    assert chosen["gate"]["passed"]
    assert chosen["img_per_s"] == max(c["img_per_s"] for c in report["candidates"] if c["gate"]["passed"])
    assert (tmp_path / "unet-auto.md").read_text().count("|") > 10


# -- real TensorRT (skipped here: no TensorRT on this machine) ----------------------------------

@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_real_tensorrt_engine_passes_parity(tmp_path, tiny_checkpoint, phantom_dir, precision):
    r = CliRunner()
    res = r.invoke(app, ["build", "--model", str(tiny_checkpoint), "--precision", precision, "--backend", "tensorrt",
                         "--calib", str(phantom_dir), "--batch", "1,4,8", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    plan = next(tmp_path.glob("*.plan"))
    res = r.invoke(app, ["parity", "--model", str(tiny_checkpoint), "--variant", precision, "--engine", str(plan),
                         "--data", str(phantom_dir), "--split", "all"])
    assert res.exit_code == 0, res.output
