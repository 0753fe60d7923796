"""`lungrt bench` end to end on a tiny model, and the PyTorch runner's CPU fast paths."""

from __future__ import annotations

import json
import time

import numpy as np
from typer.testing import CliRunner

from lungrt.models.checkpoint import load_checkpoint
from lungrt.cli import app
from lungrt.export.onnx import reference_inputs
from lungrt.backends.pytorch import TorchRunner

ROW_KEYS = {
    "backend",
    "variant",
    "batch",
    "runner",
    "img_per_s",
    "img_per_s_min",
    "img_per_s_max",
    "latency_ms_p50",
    "latency_ms_p90",
    "latency_ms_p99",
    "peak_rss_mb",
    "peak_cuda_mb",
    "gflops_per_image",
    "achieved_gflops_per_s",
    "pct_of_peak",
    "vs_torch_eager_fp32",
    "img_per_s_median",
}


def test_bench_runs_and_writes_documented_json_and_png(tmp_path, tiny_checkpoint):
    res = CliRunner().invoke(
        app,
        [
            "bench",
            "--model",
            str(tiny_checkpoint),
            "--backends",
            "torch,torch-cl,onnxruntime",
            "--variants",
            "fp32,int8",
            "--batch-sizes",
            "1,2",
            "--iters",
            "2",
            "--rounds",
            "2",
            "--warmup",
            "1",
            "--json",
            str(tmp_path / "b.json"),
            "--plot",
            str(tmp_path / "b.png"),
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "b.json").read_text())
    assert {"model", "input_size", "device", "hardware", "warmup", "iters", "rounds", "rows"} <= set(out)
    rows = [r for r in out["rows"] if "img_per_s" in r]
    assert {(r["backend"], r["variant"], r["batch"]) for r in rows} == {
        (b, v, n)
        for b, v in (("torch", "fp32"), ("torch-cl", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"))
        for n in (1, 2)
    }
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
    # the ratio column is this row's median speed over the eager row's of the same batch, from the same run
    eager = {r["batch"]: r["img_per_s_median"] for r in rows if r["backend"] == "torch" and r["variant"] == "fp32"}
    for r in rows:
        assert abs(r["vs_torch_eager_fp32"] - r["img_per_s_median"] / eager[r["batch"]]) < 1e-9
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_measures_what_the_runner_costs(tmp_path, tiny_checkpoint, monkeypatch):
    """A runner made 60 ms slower per call must show it: latency and img/s follow the delay."""
    import time

    from lungrt.backends.onnxruntime import OnnxRuntimeRunner

    real = OnnxRuntimeRunner.run
    monkeypatch.setattr(OnnxRuntimeRunner, "run", lambda self, x: (time.sleep(0.06), real(self, x))[1])
    res = CliRunner().invoke(
        app,
        [
            "bench",
            "--model",
            str(tiny_checkpoint),
            "--backends",
            "onnxruntime",
            "--variants",
            "fp32",
            "--batch-sizes",
            "2",
            "--iters",
            "3",
            "--rounds",
            "2",
            "--warmup",
            "1",
            "--json",
            str(tmp_path / "b.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    slow = next(r for r in rows if r["backend"] == "onnxruntime")
    assert slow["latency_ms_p50"] >= 60 and slow["img_per_s"] <= 2 / 0.06


def test_bench_reports_a_broken_backend_as_an_error_and_a_missing_one_as_a_skip(tmp_path, tiny_checkpoint, monkeypatch):
    from lungrt.backends.onnxruntime import OnnxRuntimeRunner

    def broken(self, *a, **k):
        raise RuntimeError("session refused the graph")

    monkeypatch.setattr(OnnxRuntimeRunner, "__init__", broken)
    res = CliRunner().invoke(
        app,
        [
            "bench",
            "--model",
            str(tiny_checkpoint),
            "--backends",
            "onnxruntime,tensorrt",
            "--variants",
            "fp32",
            "--batch-sizes",
            "1",
            "--iters",
            "1",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--json",
            str(tmp_path / "b.json"),
        ],
    )
    assert res.exit_code == 1 and "session refused the graph" in " ".join(res.output.split())
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert "error" in next(r for r in rows if r["backend"] == "onnxruntime")
    from lungrt.backends.tensorrt import gpu_environment

    if gpu_environment() is None:
        assert "NVIDIA GPU" in next(r for r in rows if r["backend"] == "tensorrt")["skipped"]


def test_channels_last_matches_eager(tiny_checkpoint):
    loaded = load_checkpoint(tiny_checkpoint)
    x = reference_inputs(loaded.spec, 3)
    a = TorchRunner(loaded).run(x)
    b = TorchRunner(loaded, channels_last=True).run(x)
    assert np.abs(a - b).max() < 1e-5


def test_end_to_end_ratio_counts_every_image_and_times_both_sides(tmp_path, tiny_checkpoint, phantom_dir):
    """The interleaved infer benchmark: every image goes through `run_infer` once per pass, and a
    model that takes 40 ms per batch makes the bare side at least that slow."""
    import time

    from lungrt.backends.onnxruntime import OnnxRuntimeRunner
    from lungrt.benchmark.endtoend import interleaved_ratio
    from lungrt.data.io import read_xray
    from lungrt.build.variants import make_variant
    from lungrt.inference.infer import collect_inputs
    from lungrt.models.checkpoint import load_checkpoint

    class SlowRunner(OnnxRuntimeRunner):  # a fake delay around the real runner
        def run(self, batch):
            time.sleep(0.04)
            return super().run(batch)

    loaded = load_checkpoint(tiny_checkpoint)
    items = collect_inputs([str(phantom_dir / "images")])[:8]
    x = np.stack([loaded.spec.apply_xray(read_xray(it.source)) for it in items[:4]])
    with SlowRunner(make_variant(loaded, "fp32", folder=tmp_path).path) as r:
        res = interleaved_ratio(r, items, x, batch_size=4, passes=1, chunks=2)
    assert res["images"] == 8 and len(res["ratio_per_round"]) == 2
    assert res["bare_model_img_per_s"] < 4 / 0.04 and 0 < res["ratio"] <= 1.2


def test_pipeline_cost_excludes_the_model(tmp_path, tiny_checkpoint, phantom_dir):
    """What infer costs around the model: measured with a replay of one batch's probabilities, so a
    model that burns 0.2 s of CPU per batch adds nothing to it."""
    from lungrt.backends.onnxruntime import OnnxRuntimeRunner
    from lungrt.benchmark.endtoend import ReplayRunner, pipeline_core_ms
    from lungrt.data.io import read_xray
    from lungrt.build.variants import make_variant
    from lungrt.inference.infer import collect_inputs
    from lungrt.models.checkpoint import load_checkpoint

    class BusyRunner(OnnxRuntimeRunner):  # a fake CPU burn around the real runner
        calls = 0

        def run(self, batch):
            BusyRunner.calls += 1
            t0 = time.process_time()
            while time.process_time() - t0 < 0.2:
                pass
            return super().run(batch)

    loaded = load_checkpoint(tiny_checkpoint)
    items = collect_inputs([str(phantom_dir / "images")])[:8]
    x = np.stack([loaded.spec.apply_xray(read_xray(it.source)) for it in items[:4]])
    with BusyRunner(make_variant(loaded, "fp32", folder=tmp_path).path) as r:
        replay = ReplayRunner(r, x)
        assert np.array_equal(replay.run(x[:2]), r.run(x)[:2]) and "replay" in replay.describe()
        BusyRunner.calls = 0
        cost = pipeline_core_ms(r, items, x, batch_size=4)
    assert BusyRunner.calls == 1  # only the replay's one batch
    print("pipeline core-ms", cost)
    assert 0 < cost < 50  # counting the model would add 2 batches x 0.2 s / 8 images = 50 ms per image


def test_bench_warns_when_eager_spreads_as_on_a_loaded_machine():
    from types import SimpleNamespace

    from lungrt.benchmark.bench import loaded_machine_warnings

    quiet = SimpleNamespace(latencies=[0.100, 0.101, 0.099, 0.102, 0.100, 0.098, 0.101, 0.100, 0.099, 0.103])
    busy = SimpleNamespace(latencies=[0.100, 0.31, 0.099, 0.25, 0.100, 0.41, 0.101, 0.18, 0.099, 0.33])
    assert loaded_machine_warnings({8: quiet}) == []
    said = loaded_machine_warnings({1: quiet, 8: busy})
    assert len(said) == 1 and said[0].startswith("batch 8:") and "loaded" in said[0]
