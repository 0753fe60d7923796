"""`lungrt bench`: throughput and latency of every backend/variant/batch against PyTorch eager FP32,
measured in one run.

Configurations are interleaved over several rounds (round-robin), so slow drift of the machine
(thermal, other processes) shows up as spread in every row rather than as a bias against whichever
ran last. Each timed call is synchronised (runners return host arrays, so a call ends when the
device is done).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lungrt.models.checkpoint import LoadedModel
from lungrt.core.errors import BackendUnavailable, LungrtError
from lungrt.core.hardware import cpu_flags, cpu_name
from lungrt.models import gflops_per_image
from lungrt.export.onnx import reference_inputs
from lungrt.build.resolve import TORCH_FAST_PATHS, open_runner
from lungrt.backends.base import Runner

# Dense peak TFLOP/s by GPU name fragment and precision (vendor datasheets), for "% of peak".
GPU_PEAK_TFLOPS = {
    "H100": {"fp32": 67.0, "fp16": 989.0, "bf16": 989.0, "int8": 1979.0},
    "H200": {"fp32": 67.0, "fp16": 989.0, "bf16": 989.0, "int8": 1979.0},
    "A100": {"fp32": 19.5, "fp16": 312.0, "bf16": 312.0, "int8": 624.0},
    "RTX 3090": {"fp32": 35.6, "fp16": 71.0, "bf16": 71.0, "int8": 284.0},
    "L4": {"fp32": 30.3, "fp16": 121.0, "bf16": 121.0, "int8": 242.0},
}


@dataclass
class Config:
    backend: str
    variant: str
    batch: int
    runner: Runner | None = None
    latencies: list[float] = field(default_factory=list)
    peak_rss_mb: float | None = None
    peak_cuda_mb: float | None = None
    skipped: str = ""
    error: str = ""

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.variant}/b{self.batch}"


def hardware() -> dict:
    import os

    import torch

    hw = {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(0)
    return hw


def _reset_peak_rss() -> None:
    try:  # Linux: writing 5 resets VmHWM (peak resident set) for this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def bench_model(
    loaded: LoadedModel,
    backends: list[str],
    variants: list[str],
    batch_sizes: list[int],
    size: int | None = None,
    warmup: int = 2,
    iters: int = 5,
    rounds: int = 3,
    device: str = "cpu",
    calib: Path | None = None,
    engines: list[Path] = (),
    log=logging.getLogger(__name__).info,
) -> dict:
    """`lungrt bench`: the variants each backend runs (INT8 gated on the validation split of `calib`
    when it is a labelled dataset) and the given TensorRT plans, timed by `run_bench`."""
    from lungrt.backends.tensorrt import read_plan_metadata
    from lungrt.data.datasets import discover_pairs, validation_pairs
    from lungrt.build.variants import make_variant

    plans = {read_plan_metadata(Path(p))["precision"]: Path(p) for p in engines}
    gate_on = validation_pairs(calib) if calib is not None and discover_pairs(calib).pairs else None

    def variant_path(v: str, backend: str) -> Path:
        if backend in ("tensorrt", "tensorrt-rtx"):
            if v not in plans:
                raise LungrtError(
                    f"no {v} TensorRT plan given: build one with `lungrt build --precision {v}` and pass --engine PLAN"
                )
            return plans[v]
        return make_variant(
            loaded, v, calib_dir=calib, log=log, target=backend, val_pairs=gate_on if v == "int8" else None
        ).path

    names = list(backends) + (["tensorrt"] if engines and "tensorrt" not in backends else [])
    result = run_bench(
        loaded, names, list(variants), batch_sizes, size, warmup, iters, rounds, device, variant_path, log=log
    )
    result["int8_gated"] = gate_on is not None
    return result


def open_config(loaded, backend: str, variant: str, device: str, variant_path) -> Runner:
    """One bench configuration (a backend name x precision), opened by the runner resolver.
    `variant_path(v, backend)` gives the file that backend runs. Missing software or hardware:
    BackendUnavailable (a skip that says why)."""
    if backend in TORCH_FAST_PATHS:
        if variant == "int8":
            raise BackendUnavailable("no int8 for PyTorch eager")
        return open_runner(loaded, backend="torch", precision=variant, device=device, options=TORCH_FAST_PATHS[backend])
    if backend == "onnxruntime" and variant == "bf16":
        raise BackendUnavailable("no bf16 variant for ONNX Runtime (OpenVINO runs bf16)")
    if backend in ("tensorrt", "tensorrt-rtx"):
        from lungrt.backends.tensorrt import gpu_environment

        if gpu_environment() is None:
            raise BackendUnavailable("running TensorRT engines needs an NVIDIA GPU; none is visible")
        return open_runner(engine=variant_path(variant, backend), precision=variant)
    if backend == "openvino":
        device = "cpu"  # lungrt's OpenVINO runs on the CPU, next to any GPU configuration
    return open_runner(
        variant_path("fp32" if variant == "bf16" else variant, backend),
        backend=backend,
        precision=variant,
        device=device,
    )


def run_bench(
    loaded: LoadedModel,
    backends: list[str],
    variants: list[str],
    batch_sizes: list[int],
    size: int | None = None,
    warmup: int = 2,
    iters: int = 10,
    rounds: int = 3,
    device: str = "cpu",
    variant_path=None,
    log=logging.getLogger(__name__).info,
) -> dict:
    import torch

    spec = loaded.spec
    size = size or spec.size
    if size != spec.size:
        raise LungrtError(f"--size {size} differs from the model's input size {spec.size}")
    images = reference_inputs(spec, max(batch_sizes))
    configs: list[Config] = []
    for backend in backends:
        for variant in variants:
            if backend in TORCH_FAST_PATHS and variant == "int8":
                continue
            if backend in TORCH_FAST_PATHS and variant == "fp16" and not device.startswith("cuda"):
                variant_t = "bf16"  # CPU autocast runs bf16, not fp16
            else:
                variant_t = variant
            for b in batch_sizes:
                configs.append(Config(backend, variant_t, b))
    if not any(c.backend == "torch" and c.variant == "fp32" for c in configs):
        configs = [Config("torch", "fp32", b) for b in batch_sizes] + configs  # the baseline always runs
    unavailable: dict[tuple[str, str], str] = {}  # said once per backend and precision, not per batch size
    for c in configs:
        if (c.backend, c.variant) in unavailable:
            c.skipped = unavailable[c.backend, c.variant]
            continue
        try:
            c.runner = open_config(loaded, c.backend, c.variant, device, variant_path)
        except BackendUnavailable as e:  # not installed / no such hardware here: a skip that says why
            c.skipped = unavailable[c.backend, c.variant] = str(e).splitlines()[0][:160]
            log(f"skip {c.backend} {c.variant}: {c.skipped}")
        except Exception as e:  # anything else is a failure of a backend that should work: an error row
            c.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
            log(f"ERROR {c.label}: {c.error}")
    live = [c for c in configs if c.runner is not None]
    for c in live:  # warm-up (compile, autotune, allocator) before any timing
        for _ in range(warmup):
            c.runner.run(images[: c.batch])
    for r in range(rounds):
        for c in live:
            _reset_peak_rss()
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            for _ in range(iters):
                t0 = time.perf_counter()
                c.runner.run(images[: c.batch])
                c.latencies.append(time.perf_counter() - t0)
            rss = _peak_rss_mb()
            c.peak_rss_mb = max(c.peak_rss_mb or 0, rss) if rss else None
            if device.startswith("cuda"):
                c.peak_cuda_mb = max(c.peak_cuda_mb or 0, torch.cuda.max_memory_allocated() / 2**20)
        log(f"round {r + 1}/{rounds} done")
    gflops = gflops_per_image(loaded.model, size)
    hw = hardware()
    base = {c.batch: c for c in live if c.backend == "torch" and c.variant == "fp32"}
    rows = []
    for c in configs:
        row = {"backend": c.backend, "variant": c.variant, "batch": c.batch}
        if c.runner is None:
            rows.append(row | ({"error": c.error} if c.error else {"skipped": c.skipped}))
            continue
        lat = np.array(c.latencies)
        per_round = lat.reshape(rounds, iters).sum(1)
        ips_rounds = c.batch * iters / per_round
        ips = float(c.batch * len(lat) / lat.sum())
        row |= {
            "runner": c.runner.describe(),
            "identity": c.runner.identity(),
            "img_per_s": ips,
            "img_per_s_min": float(ips_rounds.min()),
            "img_per_s_max": float(ips_rounds.max()),
            "latency_ms_p50": float(np.percentile(lat, 50) * 1e3),
            "latency_ms_p90": float(np.percentile(lat, 90) * 1e3),
            "latency_ms_p99": float(np.percentile(lat, 99) * 1e3),
            "peak_rss_mb": c.peak_rss_mb,
            "peak_cuda_mb": c.peak_cuda_mb,
            "gflops_per_image": gflops,
            "achieved_gflops_per_s": gflops * ips,
            "pct_of_peak": _pct_of_peak(hw["gpu"], c.variant, gflops * ips) if device.startswith("cuda") else None,
        }
        b = base.get(c.batch)
        # medians: one call slowed by another process moves a mean of 15 calls by a third, a median not at all
        row["img_per_s_median"] = float(c.batch / np.median(lat))
        row["vs_torch_eager_fp32"] = float(np.median(b.latencies) / np.median(lat)) if b else None
        rows.append(row)
    for c in live:
        c.runner.close()
    return {
        "model": loaded.info.name,
        "input_size": size,
        "device": device,
        "hardware": hw,
        "warmup": warmup,
        "iters": iters,
        "rounds": rounds,
        "rows": rows,
        "warnings": loaded_machine_warnings(base),
    }


EAGER_SPREAD_LIMIT = 0.25  # (p90 - p10) / median of PyTorch eager's calls; a quiet 2-core VM stays under 0.1


def loaded_machine_warnings(base: dict) -> list[str]:
    """One line per batch size whose PyTorch eager calls spread so widely that the machine was busy: eager
    (many threads, long calls) collapses first, so every "x eager" ratio of that batch reads too high."""
    out = []
    for batch, c in sorted(base.items()):
        lat = np.array(c.latencies)
        spread = float((np.percentile(lat, 90) - np.percentile(lat, 10)) / np.median(lat))
        if spread > EAGER_SPREAD_LIMIT:
            out.append(
                f"batch {batch}: PyTorch eager's calls spread {spread:.0%} (p10-p90 of the median): the machine "
                "was loaded while timing; its 'x eager' ratios overstate the speed-up. Rerun with nothing else "
                "running."
            )
    return out


def _pct_of_peak(gpu: str | None, variant: str, gflops_s: float) -> float | None:
    if not gpu:
        return None
    for key, peaks in GPU_PEAK_TFLOPS.items():
        if key in gpu and variant in peaks:
            return 100.0 * gflops_s / (peaks[variant] * 1e3)
    return None


def plot_bench(result: dict, path: str | Path) -> None:
    from lungrt.core.plots import figure

    rows = [r for r in result["rows"] if "img_per_s" in r]
    batches = sorted({r["batch"] for r in rows})
    labels = sorted({f"{r['backend']}/{r['variant']}" for r in rows}, key=lambda s: (not s.startswith("torch/fp32"), s))
    fig = figure(figsize=(max(6, 1.2 * len(labels) * len(batches)), 4))
    ax = fig.subplots()
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        vals, errs = [], []
        for b in batches:
            r = next((r for r in rows if f"{r['backend']}/{r['variant']}" == label and r["batch"] == b), None)
            vals.append(r["img_per_s"] if r else 0)
            errs.append(
                [[r["img_per_s"] - r["img_per_s_min"]], [r["img_per_s_max"] - r["img_per_s"]]] if r else [[0], [0]]
            )
        xs = np.arange(len(batches)) + i * width
        ax.bar(xs, vals, width, label=label, yerr=np.array(errs).squeeze(-1).T, capsize=2)
    ax.set_xticks(np.arange(len(batches)) + width * (len(labels) - 1) / 2, [f"batch {b}" for b in batches])
    ax.set_ylabel("images / s (bars: min-max over rounds)")
    hw = result["hardware"]
    ax.set_title(f"{result['model']} @ {result['input_size']}px on {hw['gpu'] or hw['cpu']}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
