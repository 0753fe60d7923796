"""TensorRT layer. Glue is tested here with a recording FAKE builder (named as such: it is not
TensorRT coverage). Real TensorRT tests are marked `tensorrt` and skip where it does not import."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lungrt.models.checkpoint import load_checkpoint
from lungrt.cli import app
from lungrt.doctor import tensorrt_status
from lungrt.backends.tensorrt import (
    BatchProfile,
    build_engine,
    check_plan_usable,
    gpu_environment,
    metadata_path,
)
from lungrt.backends.integrity import ContentMismatch
from lungrt.core.errors import LungrtError
from lungrt.build.variants import make_variant

TRT_OK, TRT_WHY = tensorrt_status("tensorrt")


class RecordingFakeBuilder:
    """FAKE TensorRT builder: records what lungrt asks for and returns placeholder bytes."""

    def __init__(self, env=None):
        self.env = env or {"flavour": "tensorrt", "tensorrt": "10.99.0", "gpu": "FAKE GPU", "compute_capability": "9.0"}
        self.calls: list[dict] = []

    def environment(self):
        return dict(self.env)

    def build(self, onnx_path, **kwargs):
        self.calls.append({"onnx": Path(onnx_path), **kwargs})
        if kwargs["timing_cache"] is not None:
            kwargs["timing_cache"].write_bytes(b"fake timing cache")
        return b"FAKE-PLAN-" + Path(onnx_path).name.encode()


@pytest.fixture(scope="module")
def fp16_onnx(tmp_path_factory, tiny_checkpoint):
    return make_variant(load_checkpoint(tiny_checkpoint), "fp16", folder=tmp_path_factory.mktemp("v")).path


def test_builder_is_asked_for_a_strongly_typed_profiled_build(tmp_path, fp16_onnx):
    fake = RecordingFakeBuilder()
    build_engine(fp16_onnx, tmp_path, BatchProfile(2, 4, 8), workspace_gib=1.5, builder=fake, log=lambda *a: None)
    (call,) = fake.calls
    assert call["strongly_typed"] is True
    assert call["input_name"] == "image"
    assert call["shapes"] == {"min": (2, 1, 64, 64), "opt": (4, 1, 64, 64), "max": (8, 1, 64, 64)}
    # the timing cache is keyed by flavour, TensorRT version and compute capability
    assert call["timing_cache"] == tmp_path / "timing-tensorrt-10.99.0-sm90.cache"
    assert call["workspace_bytes"] == int(1.5 * 2**30)
    plan = tmp_path / (fp16_onnx.name.removesuffix(".onnx") + ".trt-sm90.plan")
    assert plan.read_bytes() == b"FAKE-PLAN-" + fp16_onnx.name.encode()
    saved = json.loads(metadata_path(plan).read_text())
    assert saved["plan"] == plan.name and saved["engine_bytes"] == plan.stat().st_size
    assert saved["precision"] == "fp16" and saved["batch_profile"] == [2, 4, 8]
    assert (saved["flavour"], saved["tensorrt"], saved["gpu"], saved["compute_capability"]) == (
        "tensorrt",
        "10.99.0",
        "FAKE GPU",
        "9.0",
    )
    assert saved["model"]["name"] == "unet" and saved["model"]["preprocess"]["size"] == 64
    assert saved["onnx"] == str(fp16_onnx.resolve()) and len(saved["onnx_hash"]) == 64
    assert saved["plan_hash"] == hashlib.sha256(plan.read_bytes()).hexdigest()
    assert saved["dtype_census"]["compute_nodes"].get("float16", 0) > 0


def test_up_to_date_engine_is_a_no_op_and_timing_cache_is_per_version(tmp_path, fp16_onnx):
    fake = RecordingFakeBuilder()
    build_engine(fp16_onnx, tmp_path, builder=fake, log=lambda *a: None)
    build_engine(fp16_onnx, tmp_path, builder=fake, log=lambda *a: None)
    assert len(fake.calls) == 1  # second build: nothing to do
    other = RecordingFakeBuilder({**fake.env, "tensorrt": "11.0.0"})
    build_engine(fp16_onnx, tmp_path, builder=other, log=lambda *a: None)
    assert len(other.calls) == 1  # new TensorRT: rebuilt, and not fed the old version's timing cache
    assert other.calls[0]["timing_cache"] == tmp_path / "timing-tensorrt-11.0.0-sm90.cache"
    assert fake.calls[0]["timing_cache"].exists()
    build_engine(fp16_onnx, tmp_path, builder=other, rebuild=True, log=lambda *a: None)
    assert len(other.calls) == 2


GPU_90 = {"gpu": "FAKE GPU", "compute_capability": "9.0"}


@pytest.mark.parametrize(
    "version, gpu, needle",
    [
        ("10.99.0", {"gpu": "Other GPU", "compute_capability": "9.0"}, "GPU"),
        ("9.0", GPU_90, "installed 9.0"),
        ("10.99.0", {"gpu": "FAKE GPU", "compute_capability": "8.6"}, "compute capability"),
    ],
)
def test_stale_engines_are_refused_with_rebuild_advice(tmp_path, fp16_onnx, version, gpu, needle):
    fake = RecordingFakeBuilder()
    build_engine(fp16_onnx, tmp_path, builder=fake, log=lambda *a: None)
    plan = next(tmp_path.glob("*.plan"))
    check_plan_usable(plan, "10.99.0", GPU_90)  # same environment: fine
    with pytest.raises(LungrtError) as e:
        check_plan_usable(plan, version, gpu)
    assert needle in str(e.value) and "lungrt build" in str(e.value) and "--rebuild`" in str(e.value)


def test_plans_travel_and_are_checked_by_content(tmp_path, fp16_onnx, monkeypatch):
    """A plan and its sidecar copied to another machine run there: staleness goes by the ONNX hash
    at build time, never by the build folder's paths. Its bytes are checked against the sidecar."""
    import shutil

    build_engine(fp16_onnx, tmp_path / "build", builder=RecordingFakeBuilder(), log=lambda *a: None)
    built = next((tmp_path / "build").glob("*.plan"))
    gpu_box = tmp_path / "gpu-box"
    gpu_box.mkdir()
    for f in (built, metadata_path(built)):
        shutil.copyfile(f, gpu_box / f.name)
    shutil.rmtree(tmp_path / "build")
    monkeypatch.chdir(gpu_box)
    plan = Path(built.name)  # relative to where it landed
    assert check_plan_usable(plan, "10.99.0", GPU_90)["precision"] == "fp16"
    with open(plan, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ContentMismatch, match="plan hash"):
        check_plan_usable(plan, "10.99.0", GPU_90)
    metadata_path(plan).unlink()
    with pytest.raises(LungrtError, match=f"copy that file from the build machine next to {plan.name}"):
        check_plan_usable(plan, "10.99.0", GPU_90)


def test_doctor_says_whether_a_plan_can_run_here(tmp_path, fp16_onnx):
    build_engine(fp16_onnx, tmp_path, builder=RecordingFakeBuilder(), log=lambda *a: None)
    plan = next(tmp_path.glob("*.plan"))
    res = CliRunner().invoke(app, ["doctor", "--engine", str(plan)])
    text = " ".join(res.output.split())
    assert res.exit_code == 1 and "cannot run here" in text and "plan and sidecar: ok" in text
    # the FAKE plan says TensorRT 10.99.0, which is not installed here (or not that version)
    assert "TensorRT: NO" in text
    metadata_path(plan).unlink()
    res = CliRunner().invoke(app, ["doctor", "--engine", str(plan)])
    assert res.exit_code == 1 and "copy that file" in " ".join(res.output.split())


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
    build_engine(
        fp16_onnx, tmp_path / "eng", BatchProfile(1, 8, 32), builder=RecordingFakeBuilder(), log=lambda *a: None
    )
    plan = next((tmp_path / "eng").glob("*.plan"))
    res = CliRunner().invoke(
        app, ["package", "--engine", str(plan), "--triton", str(tmp_path / "repo"), "--name", "lungs"]
    )
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


@pytest.mark.skipif(TRT_OK, reason="checks the behaviour without a GPU for standard TensorRT")
def test_standard_tensorrt_without_gpu_fails_clearly(tmp_path, tiny_checkpoint):
    res = CliRunner().invoke(
        app, ["build", "--model", str(tiny_checkpoint), "--backend", "tensorrt", "--out", str(tmp_path)]
    )
    assert res.exit_code == 2
    assert "--backend tensorrt" in res.output and ("lungrt[trt]" in res.output or "no NVIDIA GPU" in res.output)
    assert not list(tmp_path.glob("*.plan"))


def test_onnxruntime_backend_builds_the_variant_and_verifies_it(tmp_path, tiny_checkpoint):
    res = CliRunner().invoke(
        app,
        [
            "build",
            "--model",
            str(tiny_checkpoint),
            "--precision",
            "fp16",
            "--backend",
            "onnxruntime",
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "verified" in text and "passes the fp16 gate" in text
    (onnx_file,) = tmp_path.glob("*.fp16.onnx")
    report = json.loads(onnx_file.with_name(onnx_file.name + ".build.json").read_text())
    assert report["verification"]["images"] == 16 and report["verification"]["gate"]["passed"]


def test_precision_auto_on_onnxruntime_picks_a_passing_variant(tmp_path, tiny_checkpoint, phantom_dir):
    res = CliRunner().invoke(
        app,
        [
            "build",
            "--model",
            str(tiny_checkpoint),
            "--precision",
            "auto",
            "--backend",
            "onnxruntime",
            "--data",
            str(phantom_dir),
            "--calib",
            str(phantom_dir),
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "unet-auto-onnxruntime.json").read_text())
    assert {c["precision"] for c in report["candidates"]} == {"fp32", "fp16", "int8"}
    chosen = next(c for c in report["candidates"] if c["precision"] == report["choice"])
    assert chosen["gate"]["passed"]
    top = max(c["img_per_s"] for c in report["candidates"] if c["gate"]["passed"])
    assert chosen["img_per_s"] >= 0.90 * top
    assert (tmp_path / "unet-auto-onnxruntime.md").read_text().count("|") > 10


# -- real TensorRT engines run on a GPU (skipped here: no GPU on this machine) ----------------------


@pytest.mark.tensorrt
@pytest.mark.skipif(gpu_environment() is None, reason="running TensorRT engines needs an NVIDIA GPU; none here")
@pytest.mark.parametrize("backend", ["tensorrt", "tensorrt-rtx"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_real_engine_runs_and_passes_parity(tmp_path, tiny_checkpoint, phantom_dir, backend, precision):
    ok, why = tensorrt_status(backend)
    if not ok:
        pytest.skip(why)
    r = CliRunner()
    res = r.invoke(
        app,
        [
            "build",
            "--model",
            str(tiny_checkpoint),
            "--precision",
            precision,
            "--backend",
            backend,
            "--target",
            "sm" + gpu_environment()["compute_capability"].replace(".", ""),
            "--calib",
            str(phantom_dir),
            "--batch",
            "1,4,8",
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "(engine)" in res.output  # verified by running the engine itself, not the ONNX stand-in
    plan = next(tmp_path.glob("*.plan"))
    res = r.invoke(
        app,
        [
            "parity",
            "--model",
            str(tiny_checkpoint),
            "--variant",
            precision,
            "--engine",
            str(plan),
            "--data",
            str(phantom_dir),
            "--split",
            "all",
        ],
    )
    assert res.exit_code == 0, res.output


def _edit_metadata(path: Path, key: str, edit) -> None:
    """Change one lungrt metadata entry of an ONNX file in place, as a hand (or a script) would."""
    import onnx

    model = onnx.load(str(path))
    for p in model.metadata_props:
        if p.key == key:
            p.value = edit(p.value)
    onnx.save(model, str(path))


def test_edited_onnx_metadata_is_refused_in_one_line(tmp_path, tiny_checkpoint):
    """The digest covers the metadata that decides preprocessing and QC, not only graph and weights:
    an ONNX file whose spec `mean` was edited from 0.5 to 0.9 no longer opens, whatever the hash it carries."""
    import shutil

    onnx_path = tmp_path / "m.onnx"
    shutil.copy(make_variant(load_checkpoint(tiny_checkpoint), "fp32", folder=tmp_path / "v").path, onnx_path)
    _edit_metadata(onnx_path, "lungrt.core.spec", lambda v: json.dumps({**json.loads(v), "mean": 0.9}))
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "x.png").write_bytes(b"")
    res = CliRunner().invoke(
        app, ["infer", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--onnx", str(onnx_path)]
    )
    assert res.exit_code == 2 and "lungrt metadata" in res.output and "Traceback" not in res.output, res.output
    shutil.copy(make_variant(load_checkpoint(tiny_checkpoint), "fp32", folder=tmp_path / "v").path, onnx_path)
    _edit_metadata(onnx_path, "lungrt.model", lambda v: v.replace('"qc": {', '"qc": {"edited": 1, ', 1))
    with pytest.raises(ContentMismatch, match="lungrt metadata"):
        from lungrt.backends.integrity import load_verified_onnx

        load_verified_onnx(onnx_path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: {**m, "model": {**m["model"], "preprocess": {**m["model"]["preprocess"], "mean": 0.9}}},
        lambda m: {**m, "model": {**m["model"], "qc": {"loosened": True}}},
        lambda m: {**m, "precision": "fp32"},
    ],
)
def test_an_edited_sidecar_is_refused_by_doctor_runner_and_build(tmp_path, fp16_onnx, edit):
    build_engine(fp16_onnx, tmp_path, builder=RecordingFakeBuilder(), log=lambda *a: None)
    plan = next(tmp_path.glob("*.plan"))
    sidecar = metadata_path(plan)
    sidecar.write_text(json.dumps(edit(json.loads(sidecar.read_text())), indent=2))
    with pytest.raises(ContentMismatch, match="does not match the digest"):
        check_plan_usable(plan, "10.99.0", {"gpu": "FAKE GPU", "compute_capability": "9.0"})
    res = CliRunner().invoke(app, ["doctor", "--engine", str(plan)])
    text = " ".join(res.output.split())
    assert res.exit_code == 1 and "plan and sidecar: NO" in text and "does not match the digest" in text
    said = []
    builder = RecordingFakeBuilder()
    build_engine(fp16_onnx, tmp_path, builder=builder, log=said.append)
    assert len(builder.calls) == 1 and not any("up to date" in s for s in said)  # rebuilt, not trusted
    check_plan_usable(plan, "10.99.0", {"gpu": "FAKE GPU", "compute_capability": "9.0"})


def test_doctor_knows_an_openvino_ir_is_not_a_plan(tmp_path):
    xml = tmp_path / "m.int8.xml"
    xml.write_text("<net/>")
    (tmp_path / "m.int8.bin").write_bytes(b"\0")
    res = CliRunner().invoke(app, ["doctor", "--engine", str(xml)])
    text = " ".join(res.output.split())
    assert res.exit_code == 1 and "OpenVINO IR: NO" in text and "records no lungrt content hash" in text
