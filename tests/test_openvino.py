"""OpenVINO backend: the same runner interface, the same parity gates, usable from infer and bench."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from typer.testing import CliRunner

from lungrt.backends.onnxruntime import OnnxRuntimeRunner
from lungrt.backends.openvino import OpenVinoRunner, native_bf16
from lungrt.cli import app
from lungrt.export.onnx import reference_inputs
from lungrt.build.variants import make_variant
from lungrt.models.checkpoint import load_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def fp32_onnx(tiny_checkpoint, tmp_path_factory):
    return make_variant(load_checkpoint(tiny_checkpoint), "fp32", folder=tmp_path_factory.mktemp("ov")).path


def test_openvino_fp32_matches_onnxruntime(fp32_onnx, tiny_checkpoint):
    x = reference_inputs(load_checkpoint(tiny_checkpoint).spec, 3)
    with OpenVinoRunner(fp32_onnx) as ov, OnnxRuntimeRunner(fp32_onnx) as ort:
        a, b = ov.run(x), ort.run(x)
        assert ov.describe() == "openvino/cpu/fp32" and ov.weights_id == ort.weights_id
    assert a.shape == b.shape and np.abs(a - b).max() < 1e-4


def test_parity_gate_on_openvino(tiny_checkpoint, phantom_dir):
    res = runner.invoke(
        app,
        [
            "parity",
            "--model",
            str(tiny_checkpoint),
            "--backend",
            "openvino",
            "--variant",
            "fp32",
            "--data",
            str(phantom_dir),
            "--split",
            "all",
        ],
    )
    assert res.exit_code == 0 and "PASS" in res.output, res.output
    if native_bf16():
        res = runner.invoke(
            app,
            [
                "parity",
                "--model",
                str(tiny_checkpoint),
                "--backend",
                "openvino",
                "--variant",
                "bf16",
                "--data",
                str(phantom_dir),
                "--split",
                "all",
            ],
        )
        assert "openvino/cpu/bf16" in " ".join(res.output.split()), res.output


def test_infer_on_openvino_gives_the_same_masks_as_onnxruntime(tmp_path, tiny_checkpoint, phantom_dir):
    outs = {}
    for backend in ("onnxruntime", "openvino"):
        out = tmp_path / backend
        res = runner.invoke(
            app,
            [
                "infer",
                str(phantom_dir / "images"),
                "--out",
                str(out),
                "--model",
                str(tiny_checkpoint),
                "--backend",
                backend,
            ],
        )
        assert res.exit_code == 0, res.output
        with open(out / "results.csv") as f:
            outs[backend] = {r["path"]: r for r in csv.DictReader(f)}
    assert outs["openvino"].keys() == outs["onnxruntime"].keys()
    assert all(r["backend"] == "openvino/cpu/fp32" for r in outs["openvino"].values())
    diff = [
        abs(float(outs["openvino"][k]["lung_fraction"]) - float(outs["onnxruntime"][k]["lung_fraction"]))
        for k in outs["onnxruntime"]
    ]
    assert max(diff) < 1e-3


def test_bf16_is_refused_or_skipped_where_the_cpu_has_none(fp32_onnx):
    if native_bf16():
        with OpenVinoRunner(fp32_onnx, precision="bf16") as r:
            assert r.precision == "bf16"
    else:
        from lungrt.core.errors import BackendUnavailable

        with pytest.raises(BackendUnavailable):
            OpenVinoRunner(fp32_onnx, precision="bf16")


def test_bf16_is_not_native_under_a_onednn_cap_without_it(monkeypatch, fp32_onnx):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    assert not native_bf16()
    with pytest.raises(Exception, match="no native bf16"):
        OpenVinoRunner(fp32_onnx, precision="bf16")
