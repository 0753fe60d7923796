"""`lungrt bench` end to end on a tiny model, and the PyTorch runner's CPU fast paths."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from lungrt.checkpoint import load_checkpoint
from lungrt.cli import app
from lungrt.export import reference_inputs
from lungrt.runners import TorchRunner

ROW_KEYS = {"backend", "variant", "batch", "runner", "img_per_s", "img_per_s_min", "img_per_s_max", "latency_ms_p50",
            "latency_ms_p90", "latency_ms_p99", "peak_rss_mb", "peak_cuda_mb", "gflops_per_image",
            "achieved_gflops_per_s", "pct_of_peak", "vs_torch_eager_fp32"}


def test_bench_runs_and_writes_documented_json_and_png(tmp_path, tiny_checkpoint):
    res = CliRunner().invoke(app, ["bench", "--model", str(tiny_checkpoint), "--backends", "torch,torch-cl,onnxruntime",
                                   "--variants", "fp32,int8", "--batch-sizes", "1,2", "--iters", "2", "--rounds", "2",
                                   "--warmup", "1", "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "b.json").read_text())
    assert {"model", "input_size", "device", "hardware", "warmup", "iters", "rounds", "rows"} <= set(out)
    rows = [r for r in out["rows"] if "img_per_s" in r]
    assert {(r["backend"], r["variant"], r["batch"]) for r in rows} == {
        (b, v, n) for b, v in (("torch", "fp32"), ("torch-cl", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"))
        for n in (1, 2)}
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["img_per_s_min"] <= r["img_per_s"] * 1.0001 and r["img_per_s"] <= r["img_per_s_max"] * 1.0001
        assert r["latency_ms_p50"] <= r["latency_ms_p99"]
    eager = [r for r in rows if r["backend"] == "torch" and r["variant"] == "fp32"]
    assert all(abs(r["vs_torch_eager_fp32"] - 1.0) < 1e-9 for r in eager)
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_channels_last_matches_eager(tiny_checkpoint):
    loaded = load_checkpoint(tiny_checkpoint)
    x = reference_inputs(loaded.spec, 3)
    a = TorchRunner(loaded).run(x)
    b = TorchRunner(loaded, channels_last=True).run(x)
    assert np.abs(a - b).max() < 1e-5
