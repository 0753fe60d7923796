"""What lungrt verifies is what it runs: one resolver turns every combination the CLI and the API
accept into the runner that was asked for, or refuses in one line; artifacts are checked by content."""

from __future__ import annotations

import itertools
import json
import os
import shutil

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from lungrt.backends.integrity import CONTENT_KEY, ContentMismatch, load_verified, load_verified_onnx
from lungrt.backends.onnxruntime import OnnxRuntimeRunner
from lungrt.backends.pytorch import TorchRunner
from lungrt.build.resolve import BACKENDS, RUNNER_PRECISIONS, open_runner
from lungrt.cli import app
from lungrt.core.errors import LungrtError
from lungrt.build.variants import make_variant
from lungrt.models.checkpoint import load_checkpoint

runner = CliRunner()
DEVICES = ("auto", "cpu", "cuda")


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_checkpoint, phantom_dir):
    folder = tmp_path_factory.mktemp("resolver")
    loaded = load_checkpoint(tiny_checkpoint)
    made = {
        p: make_variant(
            loaded,
            p,
            folder=folder,
            calib_dir=phantom_dir if p == "int8" else None,
            cache_dir=folder,
            target="onnxruntime",
            log=lambda *a: None,
        ).path
        for p in ("fp32", "fp16", "int8")
    }
    ir = make_variant(
        loaded, "int8", folder=folder, calib_dir=phantom_dir, cache_dir=folder, target="openvino", log=lambda *a: None
    ).path  # OpenVINO's INT8: an IR (whole graph: no gate asked here)
    from lungrt.backends.tensorrt import BatchProfile, PolygraphyBuilder, build_engine

    meta = build_engine(
        made["fp16"], folder, BatchProfile(1, 2, 4), builder=PolygraphyBuilder("tensorrt-rtx"), log=lambda *a: None
    )  # a real TensorRT-RTX plan, built ahead of time
    return {
        "weights": tiny_checkpoint,
        **{f"{p}.onnx": path for p, path in made.items()},
        "int8.xml": ir,
        "plan": folder / meta["plan"],
    }


def _ground_truth(r) -> tuple[str, str, str]:
    """What a runner really is, read from its class and its engine (not from its own labels)."""
    from lungrt.backends.openvino import OpenVinoRunner

    if r.backend.startswith("tensorrt"):
        return json.loads(r.path.with_name(r.path.name + ".json").read_text())["flavour"], r.precision, "cuda"
    if isinstance(r, TorchRunner):
        dtype = {None: "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}[
            None if r.dtype is None else str(r.dtype)
        ]
        return "torch", dtype, str(next(r.model.parameters()).device)
    if r.path.suffix == ".xml":  # an IR: what OpenVINO's own reader finds in it
        import openvino as ov

        meta = json.loads(ov.Core().read_model(str(r.path)).get_rt_info(["lungrt", "metadata"]).astype(str))
    else:
        meta = {p.key: p.value for p in onnx.load(str(r.path), load_external_data=False).metadata_props}
    file_precision = meta.get("lungrt.export.precision", "fp32")
    if isinstance(r, OpenVinoRunner):
        hint = str(r.compiled.get_property("INFERENCE_PRECISION_HINT"))
        return "openvino", "bf16" if "bfloat16" in hint and file_precision == "fp32" else file_precision, "cpu"
    assert isinstance(r, OnnxRuntimeRunner)
    return "onnxruntime", file_precision, "cpu"


@pytest.mark.parametrize("kind", ["weights", "fp32.onnx", "fp16.onnx", "int8.onnx", "int8.xml", "plan"])
def test_every_combination_opens_what_was_asked_or_is_refused_in_one_line(files, kind):
    from lungrt.backends.tensorrt import gpu_environment

    opened, refused = 0, 0
    for backend, precision, device in itertools.product(BACKENDS, (None, *RUNNER_PRECISIONS), DEVICES):
        try:
            r = open_runner(files[kind], backend=backend, precision=precision, device=device, log=lambda *a: None)
        except LungrtError as e:
            assert "\n" not in str(e) and str(e), (backend, precision, device, str(e))
            refused += 1
            continue
        with r:
            real_backend, real_precision, real_device = _ground_truth(r)
            asked = (backend, precision, device)
            assert backend == "auto" or real_backend == backend, asked
            assert precision is None or real_precision == precision, (asked, real_precision)
            assert device == "auto" or real_device == device.split(":")[0], asked
            assert (r.backend, r.precision) == (real_backend, real_precision), asked  # it says what it is
            if r.path is not None:  # and which verified bytes it runs
                assert r.content_hash == load_verified(r.path).content_hash
            out = r.run(np.zeros((1, 1, r.spec.size, r.spec.size), np.float32))
            assert out.shape == (1, 1, r.spec.size, r.spec.size)
        opened += 1
    assert refused and (opened or (kind == "plan" and gpu_environment() is None))


def test_a_file_is_never_run_as_another_precision(files):
    with pytest.raises(LungrtError, match="precision fp32, not int8"):
        open_runner(files["fp32.onnx"], backend="onnxruntime", precision="int8")
    with pytest.raises(LungrtError, match="bf16 is OpenVINO's"):
        open_runner(files["fp32.onnx"], backend="onnxruntime", precision="bf16")
    with pytest.raises(LungrtError, match="compile it first"):
        open_runner(files["fp32.onnx"], backend="tensorrt-rtx")


def test_parity_runs_the_backend_and_precision_it_names(files, tiny_checkpoint, phantom_dir):
    """The README's item: --onnx with --backend openvino --variant bf16 ran ONNX Runtime FP32 and said PASS."""
    from lungrt.backends.openvino import native_bf16

    args = [
        "parity",
        "--model",
        str(tiny_checkpoint),
        "--onnx",
        str(files["fp32.onnx"]),
        "--backend",
        "openvino",
        "--variant",
        "bf16",
        "--data",
        str(phantom_dir),
        "--split",
        "all",
        "--limit",
        "4",
    ]
    res = runner.invoke(app, args)
    text = " ".join(res.output.split())
    if native_bf16():
        assert "parity openvino/cpu/bf16 vs torch/cpu/fp32" in text and "(bf16 gate)" in text, text
        assert load_verified_onnx(files["fp32.onnx"]).content_hash in text  # what it verified, by content
    else:
        assert res.exit_code == 2 and "no native bf16" in text
    res = runner.invoke(
        app,
        [
            "parity",
            "--model",
            str(tiny_checkpoint),
            "--onnx",
            str(files["fp32.onnx"]),
            "--variant",
            "int8",
            "--data",
            str(phantom_dir),
            "--limit",
            "2",
        ],
    )
    assert res.exit_code == 2 and "not int8" in " ".join(res.output.split()) and "Traceback" not in res.output
    # without --model, the reference is the weights the file records; a checkpoint it cannot find is asked for
    res = runner.invoke(app, ["parity", "--onnx", str(files["fp32.onnx"]), "--data", str(phantom_dir), "--limit", "2"])
    assert res.exit_code == 2 and "pass the checkpoint it was exported from with --model" in " ".join(
        res.output.split()
    )


def _flip_signs(path, nbytes: int = 8192) -> None:
    """Sign-flip the float32 weights of the largest initializer, in place, keeping the mtime."""
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    model = onnx.load_from_string(bytes(data))
    raw = max((i.raw_data for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT), key=len)
    at = bytes(data).find(raw)
    assert at > 0 and len(raw) >= 64
    for k in range(at + 3, at + min(len(raw), nbytes), 4):
        data[k] ^= 0x80
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_corrupted_cached_variant_is_made_again_and_a_users_file_is_refused(
    tmp_path, tiny_checkpoint, phantom_dir, monkeypatch
):
    monkeypatch.setenv("LUNGRT_CACHE", str(tmp_path / "cache"))
    loaded = load_checkpoint(tiny_checkpoint)
    with open_runner(tiny_checkpoint, backend="onnxruntime", precision="fp32") as r:
        cached, good_hash = r.path, r.content_hash
        x = np.stack([loaded.spec.apply(np.full((64, 64), v, np.float32)) for v in (0.2, 0.5)])
        good = r.run(x)
    _flip_signs(cached)
    with pytest.raises(ContentMismatch, match="do not match the content hash"):
        open_runner(onnx=cached)  # a file named by the user: refused in one line
    res = runner.invoke(
        app, ["infer", str(phantom_dir / "images"), "--out", str(tmp_path / "o"), "--onnx", str(cached)]
    )
    assert res.exit_code == 2 and "content hash" in " ".join(res.output.split()) and "Traceback" not in res.output
    with open_runner(tiny_checkpoint, backend="onnxruntime", precision="fp32") as r:  # the cache heals itself
        assert r.path == cached and r.content_hash == good_hash
        assert np.array_equal(r.run(x), good)


def test_an_onnx_without_a_content_hash_is_refused(tmp_path, files):
    model = onnx.load(str(files["fp32.onnx"]))
    kept = [p for p in model.metadata_props if p.key != CONTENT_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(tmp_path / "old.onnx"))
    with pytest.raises(ContentMismatch, match="records no content hash"):
        open_runner(tmp_path / "old.onnx")


def test_an_edited_openvino_ir_is_refused_and_a_cached_one_made_again(tmp_path, tiny_checkpoint, phantom_dir):
    """OpenVINO's INT8 IR is checked by content like every artifact: its .xml and its .bin."""
    loaded = load_checkpoint(tiny_checkpoint)

    def made():
        return make_variant(
            loaded,
            "int8",
            folder=tmp_path,
            calib_dir=phantom_dir,
            cache_dir=tmp_path,
            target="openvino",
            log=lambda *a: None,
        ).path

    xml = made()
    weights = xml.with_suffix(".bin")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights
    weights.write_bytes(bytes(data))
    with pytest.raises(ContentMismatch, match="do not match the content hash"):
        open_runner(xml)
    assert made() == xml  # the cache heals itself: made again (OpenVINO numbers its nodes per process, so
    load_verified(xml)  # the .xml, and its hash, may differ from the first one's)
    text = xml.read_text()
    xml.write_text(text.replace("<lungrt>", '<lungrt>\n<note value="edited" />', 1))  # the graph file edited
    with pytest.raises(ContentMismatch):
        open_runner(xml, backend="openvino")
    xml.write_text(text)
    with pytest.raises(LungrtError, match="an OpenVINO IR runs on openvino, not onnxruntime"):
        open_runner(xml, backend="onnxruntime")
    xml.with_suffix(".bin").unlink()
    with pytest.raises(LungrtError, match="does not exist"):
        open_runner(xml)


def test_infer_records_the_artifact_that_ran(tmp_path, files, phantom_dir):
    res = runner.invoke(
        app, ["infer", str(phantom_dir / "images"), "--out", str(tmp_path / "o"), "--onnx", str(files["fp16.onnx"])]
    )
    assert res.exit_code == 0, res.output
    run = json.loads((tmp_path / "o" / ".lungrt-records" / "run.json").read_text())
    assert run["artifact"] == load_verified_onnx(files["fp16.onnx"]).content_hash
    assert run["runner"] == "onnxruntime/cpu/fp16" and run["precision"] == "fp16"


def test_an_openvino_ir_runs_from_the_cli_and_is_not_compiled_for_tensorrt(tmp_path, files, phantom_dir):
    ir = files["int8.xml"]
    res = runner.invoke(app, ["infer", str(phantom_dir / "images"), "--out", str(tmp_path / "o"), "--onnx", str(ir)])
    assert res.exit_code == 0, res.output
    run = json.loads((tmp_path / "o" / ".lungrt-records" / "run.json").read_text())
    assert run["runner"] == "openvino/cpu/int8" and run["artifact"] == load_verified(ir).content_hash
    res = runner.invoke(app, ["build", "--onnx", str(ir), "--backend", "tensorrt-rtx", "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "OpenVINO IR" in res.output and "Traceback" not in res.output


def test_build_from_an_onnx_file_verifies_like_every_build(tmp_path, files, tiny_checkpoint):
    onnx_file = tmp_path / "model.fp32.onnx"
    shutil.copyfile(files["fp32.onnx"], onnx_file)
    res = runner.invoke(
        app,
        [
            "build",
            "--onnx",
            str(onnx_file),
            "--model",
            str(tiny_checkpoint),
            "--backend",
            "tensorrt-rtx",
            "--batch",
            "1,2,4",
            "--out",
            str(tmp_path / "eng"),
        ],
    )
    text = " ".join(res.output.split())
    assert res.exit_code == 0, res.output
    assert "verified model.fp32.rtx-sm86.plan" in text and "passes the fp32 gate" in text
    report = json.loads(next((tmp_path / "eng").glob("*.plan.build.json")).read_text())
    assert report["verification"]["gate"]["passed"] and report["verification"]["runner"]["content_hash"]
    # weights other than the ones the file was exported from cannot verify it: refused
    res = runner.invoke(
        app,
        [
            "build",
            "--onnx",
            str(onnx_file),
            "--model",
            "unet",
            "--backend",
            "tensorrt-rtx",
            "--out",
            str(tmp_path / "eng2"),
        ],
    )
    assert res.exit_code == 2 and "pass the checkpoint it was exported from" in " ".join(res.output.split())
