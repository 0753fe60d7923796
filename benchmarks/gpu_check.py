"""The GPU check: what a lent NVIDIA machine (PyTorch with CUDA, no TensorRT, no internet) measures in under 8 minutes.

    python benchmarks/gpu_check.py --out DIR            # on the GPU machine (benchmarks/gpu_check.sh wraps it)
    python benchmarks/gpu_check.py --out DIR --dry      # the same code on this CPU at tiny sizes (CI runs it)

Parts, each written to DIR/gpu_check.json as soon as it ends (a part that fails or lacks a module is recorded
as such, the others still run; a run cut short keeps what was done):
1. `throughput`: img/s of the three shipped models on PyTorch CUDA in fp16 and bf16 autocast, each with and
   without a CUDA graph, per batch size (interleaved rounds; medians).
2. `parity`: each of those configurations against PyTorch FP32 on the CPU, on the same chest phantoms:
   max |probability difference| and mask agreement (threshold 0.5), the numbers lungrt's gates use.
3. `end_to_end`: `lungrt infer` on native-size 16-bit DICOMs with a process pool of helpers against the
   bare model on the same runner (`lungrt.benchmark.endtoend.interleaved_ratio`), img/s and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FULL = dict(
    models=("unet", "gsconv-unet", "msag-unet"),
    batches=(1, 8, 32),
    seconds=1.0,
    rounds=3,
    parity_images=16,
    dicoms=96,
    dicom_shape=(2500, 2048),
    e2e_batch=16,
    workers=14,
)
DRY = dict(
    models=("unet",),
    batches=(1, 2),
    seconds=0.05,
    rounds=1,
    parity_images=2,
    dicoms=4,
    dicom_shape=(160, 128),
    e2e_batch=2,
    workers=2,
)
PRECISIONS = ("fp16", "bf16")


def environment(device: str) -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "cpu_count": os.cpu_count(),
        "cpu_flags": _cpu_flags(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env |= {
            "gpu": props.name,
            "capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": props.total_memory / 2**30,
        }
    return env


def _cpu_flags() -> list[str]:
    """The lscpu flags that decide CPU kernels (what every speed claim names)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("Flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "avx_vnni"))


def load_models(names, dry: bool) -> dict:
    """name -> LoadedModel: the shipped weights; in dry mode a width-4 network of the same architecture."""
    from lungrt.core.spec import PreprocessSpec
    from lungrt.models import build_model
    from lungrt.models.checkpoint import LoadedModel, ModelInfo, resolve_model

    if dry:
        return {n: LoadedModel(build_model(n, 4).eval(), ModelInfo(n, 4, PreprocessSpec(size=64))) for n in names}
    return {n: resolve_model(n) for n in names}


def phantoms(spec, count: int, seed: int = 0) -> np.ndarray:
    """Network inputs of chest phantoms, preprocessed as every backend preprocesses them."""
    from lungrt.data.io import XRay
    from lungrt.data.phantoms import make_chest_phantom

    return np.stack(
        [
            spec.apply_xray(XRay("", (make_chest_phantom(seed + i, 320).image * 255).astype(np.uint8)))
            for i in range(count)
        ]
    )


def cuda_runner(loaded, device: str, precision: str, graph: bool):
    from lungrt.backends.pytorch import TorchRunner

    return TorchRunner(loaded, device=device, precision=precision, cuda_graph=graph and device == "cuda")


def throughput_part(cfg: dict, device: str, models: dict) -> dict:
    """img/s per model, precision, CUDA graph and batch: medians of interleaved rounds."""
    from lungrt.evaluation.parity import throughput

    rows, samples = [], {}
    configs = [(m, p, g, b) for m in models for p in PRECISIONS for g in (False, True) for b in cfg["batches"]]
    runners = {}
    for _ in range(cfg["rounds"]):
        for m, p, g, b in configs:
            if g and device != "cuda":
                continue  # a CUDA graph needs CUDA: the dry run covers the loop, not the capture
            key = (m, p, g)
            runners.setdefault(key, cuda_runner(models[m], device, p, g))
            x = phantoms(models[m].spec, b) if (m, b) not in samples else samples[(m, b)]
            samples[(m, b)] = x
            rows.append(
                dict(model=m, precision=p, cuda_graph=g, batch=b, img_per_s=throughput(runners[key], x, cfg["seconds"]))
            )
    return {"rows": _medians(rows)}


def _medians(rows: list[dict]) -> list[dict]:
    keyed: dict[tuple, list[float]] = {}
    for r in rows:
        keyed.setdefault((r["model"], r["precision"], r["cuda_graph"], r["batch"]), []).append(r["img_per_s"])
    return [
        dict(model=m, precision=p, cuda_graph=g, batch=b, img_per_s=float(np.median(v)), rounds=len(v))
        for (m, p, g, b), v in keyed.items()
    ]


def parity_part(cfg: dict, device: str, models: dict) -> dict:
    """Each configuration against PyTorch FP32 on the CPU, same inputs."""
    from lungrt.backends.pytorch import TorchRunner

    rows = []
    for name, loaded in models.items():
        x = phantoms(loaded.spec, cfg["parity_images"], seed=100)
        reference = TorchRunner(loaded, device="cpu").run(x)
        for p in PRECISIONS:
            for g in (False, True) if device == "cuda" else (False,):
                got = cuda_runner(loaded, device, p, g).run(x)
                agree = float(np.mean((got > 0.5) == (reference > 0.5)))
                rows.append(
                    dict(
                        model=name,
                        precision=p,
                        cuda_graph=g,
                        max_abs_prob_diff=float(np.abs(got - reference).max()),
                        mask_agreement=agree,
                    )
                )
    return {"reference": "torch fp32 on the CPU", "rows": rows}


def write_dicoms(folder: Path, count: int, shape: tuple[int, int]) -> list[Path]:
    """Native-size 16-bit DX chest phantoms (12 bits stored), as a detector writes them."""
    import cv2

    from lungrt.data.dicom import write_dicom
    from lungrt.data.phantoms import make_chest_phantom

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        small = make_chest_phantom(500 + i, 512).image
        pixels = (cv2.resize(small, shape[::-1], interpolation=cv2.INTER_LINEAR) * 4095).astype(np.uint16)
        path = folder / f"dx_{i:04d}.dcm"
        write_dicom(path, pixels, spacing_mm=(0.14, 0.14))
        paths.append(path)
    return paths


def end_to_end_part(cfg: dict, device: str, models: dict) -> dict:
    """`lungrt infer` (process pool) against the bare model, fp16 with a CUDA graph where there is CUDA."""
    from lungrt.benchmark.endtoend import interleaved_ratio
    from lungrt.inference.infer import collect_inputs

    name = "msag-unet" if "msag-unet" in models else next(iter(models))
    loaded = models[name]
    runner = cuda_runner(loaded, device, "fp16", graph=device == "cuda")
    with tempfile.TemporaryDirectory(prefix="lungrt-gpu-check-") as tmp:
        write_dicoms(Path(tmp), cfg["dicoms"], cfg["dicom_shape"])
        items = collect_inputs([tmp])
        x = phantoms(loaded.spec, cfg["e2e_batch"])
        res = interleaved_ratio(
            runner, items, x, cfg["e2e_batch"], passes=1, chunks=2, workers=cfg["workers"], pool="process"
        )
    return {"model": name, "dicom_shape": list(cfg["dicom_shape"]), "workers": cfg["workers"], "pool": "process", **res}


PARTS = {"throughput": throughput_part, "parity": parity_part, "end_to_end": end_to_end_part}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    ap.add_argument("--dry", action="store_true", help="this CPU, tiny sizes: the same code path (CI)")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma list of parts to run")
    args = ap.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.dry else "cpu"
    cfg = DRY if args.dry else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_check.json"
    result = {
        "command": " ".join(["python", "benchmarks/gpu_check.py", *(argv or sys.argv[1:])]),
        "dry": args.dry,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": environment(device),
        "parts": {},
    }
    try:
        models = load_models(cfg["models"], args.dry)
    except ModuleNotFoundError as e:
        result["parts"] = {
            p: {"skipped": f"missing module {e.name} (carry its wheel: benchmarks/gpu_wheels.sh)"} for p in PARTS
        }
        path.write_text(json.dumps(result, indent=2))
        return 1
    for name in args.parts.split(","):
        t0 = time.perf_counter()
        try:
            result["parts"][name] = PARTS[name](cfg, device, models)
        except ModuleNotFoundError as e:
            result["parts"][name] = {"skipped": f"missing module {e.name} (carry its wheel: benchmarks/gpu_wheels.sh)"}
        except Exception as e:  # one part failing keeps the others' numbers
            result["parts"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        result["parts"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps(result, indent=2))
        print(f"{name}: {json.dumps(result['parts'][name])[:400]}", flush=True)
    return 0 if all("error" not in p and "skipped" not in p for p in result["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
