"""TensorRT engines: a thin, standard compile step over Polygraphy, plus the metadata that makes
engines safe to reuse (staleness) and a Triton model-repository export.

Every precision decision is already in the ONNX graph (precision module), so the engine is always
built strongly typed: the only network kind TensorRT 11 has, and valid on 10.x too. There are no
FP16/INT8 builder flags and no calibrator here by design.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from . import __version__
from .errors import LungrtError
from .export import file_hash
from .runners import INPUT_NAME, OUTPUT_NAME, onnx_metadata

TIMING_CACHE = "timing.cache"


@dataclass(frozen=True)
class BatchProfile:
    min: int = 1
    opt: int = 8
    max: int = 16

    @classmethod
    def parse(cls, text: str) -> "BatchProfile":
        try:
            lo, opt, hi = (int(v) for v in text.split(","))
        except ValueError:
            raise LungrtError(f"--batch must be MIN,OPT,MAX (e.g. 1,8,16), got {text!r}") from None
        if not 1 <= lo <= opt <= hi:
            raise LungrtError(f"--batch needs 1 <= MIN <= OPT <= MAX, got {text!r}")
        return cls(lo, opt, hi)


class EngineBuilder(Protocol):
    """What lungrt asks of TensorRT. The real one is Polygraphy; tests use a recording fake."""

    def environment(self) -> dict: ...

    def build(self, onnx_path: Path, *, strongly_typed: bool, input_name: str, shapes: dict, timing_cache: Path,
              workspace_bytes: int) -> bytes: ...


class PolygraphyBuilder:
    """Builds with Polygraphy's loaders: parse ONNX strongly typed, one optimization profile,
    persisted timing cache, workspace limit."""

    def environment(self) -> dict:
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            raise LungrtError("TensorRT build needs an NVIDIA GPU; none is visible")
        major, minor = torch.cuda.get_device_capability(0)
        return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}

    def build(self, onnx_path: Path, *, strongly_typed: bool, input_name: str, shapes: dict, timing_cache: Path,
              workspace_bytes: int) -> bytes:
        import tensorrt as trt
        from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

        network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed)
        profile = Profile().add(input_name, min=shapes["min"], opt=shapes["opt"], max=shapes["max"])
        config = CreateConfig(
            profiles=[profile],
            load_timing_cache=str(timing_cache) if timing_cache.exists() else None,
            memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace_bytes},
        )
        return bytes(EngineBytesFromNetwork(network, config=config, save_timing_cache=str(timing_cache))())


def metadata_path(plan: Path) -> Path:
    return plan.with_name(plan.name + ".json")


def engine_name(onnx_path: Path) -> str:
    return onnx_path.name.removesuffix(".onnx")


def build_engine(onnx_path: str | Path, out_dir: str | Path = "engines", batch: BatchProfile = BatchProfile(),
                 workspace_gib: float = 4.0, builder: EngineBuilder | None = None, rebuild: bool = False, log=print) -> dict:
    """Build (or reuse) the plan for one precision-variant ONNX file; returns its metadata."""
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    builder = builder or PolygraphyBuilder()
    env = builder.environment()
    meta_onnx = onnx_metadata(onnx_path)
    plan = out_dir / f"{engine_name(onnx_path)}.plan"
    wanted = {"onnx_hash": file_hash(onnx_path), "batch_profile": [batch.min, batch.opt, batch.max], **env}
    if plan.exists() and metadata_path(plan).exists() and not rebuild:
        existing = json.loads(metadata_path(plan).read_text())
        if not stale_reasons(existing, wanted):
            log(f"{plan} is up to date; nothing to build")
            return existing
    size = json.loads(meta_onnx["lungrt.preprocess"])["size"]
    shapes = {k: (n, 1, size, size) for k, n in (("min", batch.min), ("opt", batch.opt), ("max", batch.max))}
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = builder.build(onnx_path, strongly_typed=True, input_name=INPUT_NAME, shapes=shapes,
                         timing_cache=out_dir / TIMING_CACHE, workspace_bytes=int(workspace_gib * 2**30))
    calibration = json.loads(meta_onnx.get("lungrt.calibration", "null"))
    meta = {
        **wanted,
        "model": json.loads(meta_onnx["lungrt.model"]),
        "weights_hash": meta_onnx.get("lungrt.weights_hash"),
        "precision": meta_onnx.get("lungrt.precision", "fp32"),
        "onnx": str(onnx_path),
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", 1, size, size]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", 1, size, size]},
        "calibration": calibration,
        "strongly_typed": True,
        "lungrt_version": __version__,
        "build_seconds": round(time.time() - t0, 2),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    tmp = plan.with_name(f".{plan.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(plan)
    metadata_path(plan).write_text(json.dumps(meta, indent=2))
    log(f"built {plan} ({meta['precision']}, batch {batch.min}-{batch.max}) in {meta['build_seconds']} s")
    return meta


def stale_reasons(meta: dict, current: dict) -> list[str]:
    """Why an existing plan may not be used here: other TensorRT, other GPU, other ONNX."""
    reasons = []
    for key, what in (("tensorrt", "TensorRT version"), ("gpu", "GPU"), ("compute_capability", "compute capability"),
                      ("onnx_hash", "ONNX graph"), ("batch_profile", "batch profile")):
        if key in current and meta.get(key) != current[key]:
            reasons.append(f"{what} {meta.get(key)} != {current[key]}")
    return reasons


def check_plan_usable(plan: Path, env: dict) -> dict:
    """Metadata of a plan, or a LungrtError saying why it cannot run here and how to rebuild."""
    mp = metadata_path(plan)
    if not plan.exists():
        raise LungrtError(f"{plan}: engine file does not exist")
    if not mp.exists():
        raise LungrtError(f"{plan}: no metadata file {mp.name}; rebuild it with `lungrt build`")
    meta = json.loads(mp.read_text())
    reasons = stale_reasons(meta, env)
    onnx = Path(meta.get("onnx", ""))
    if onnx.exists() and file_hash(onnx) != meta.get("onnx_hash"):
        reasons.append("the ONNX file it was built from has changed")
    if reasons:
        raise LungrtError(f"{plan}: stale engine ({'; '.join(reasons)}); rebuild with "
                          f"`lungrt build --onnx {meta.get('onnx', 'MODEL.onnx')} --rebuild-stale`")
    return meta


# -- Triton --------------------------------------------------------------------------------------

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int8": "TYPE_INT8"}


def triton_config(name: str, meta: dict) -> str:
    """config.pbtxt for a TensorRT plan: the batch axis is Triton's, so dims omit it."""
    lo, opt, hi = meta["batch_profile"]
    preferred = sorted({b for b in (opt, hi) if b > 1})

    def tensor(t: dict) -> str:
        dims = ", ".join(str(d) for d in t["shape"][1:])
        return f'  {{\n    name: "{t["name"]}"\n    data_type: {TRITON_DTYPES[t["dtype"]]}\n    dims: [ {dims} ]\n  }}'

    return "\n".join([
        f'name: "{name}"',
        'platform: "tensorrt_plan"',
        f"max_batch_size: {hi}",
        f"input [\n{tensor(meta['input'])}\n]",
        f"output [\n{tensor(meta['output'])}\n]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(map(str, preferred or [hi]))} ]",
        "  max_queue_delay_microseconds: 2000",
        "}",
        "instance_group [\n  {\n    count: 1\n    kind: KIND_GPU\n  }\n]",
        f'parameters {{\n  key: "lungrt_preprocess"\n  value: {{ string_value: {json.dumps(json.dumps(meta["model"]["preprocess"], sort_keys=True))} }}\n}}',
        "",
    ])


def export_triton(plan: str | Path, repo: str | Path, name: str | None = None) -> Path:
    """DIR/<name>/config.pbtxt + DIR/<name>/1/model.plan, servable by Triton unchanged."""
    import shutil

    plan = Path(plan)
    mp = metadata_path(plan)
    if not mp.exists():
        raise LungrtError(f"{plan}: no engine metadata ({mp.name}); build it with `lungrt build`")
    meta = json.loads(mp.read_text())
    name = name or f"lungrt_{meta['model']['name'].replace('-', '_')}_{meta['precision']}"
    model_dir = Path(repo) / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(plan, model_dir / "1" / "model.plan")
    (model_dir / "config.pbtxt").write_text(triton_config(name, meta))
    return model_dir
