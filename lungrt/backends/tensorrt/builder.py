"""Compiling an engine (Polygraphy's loader side): a strongly typed plan from a verified ONNX variant, with its
optimization profile and, on standard TensorRT, a timing cache. Every precision decision is already in the
ONNX graph (export.precision), so there are no FP16/INT8 builder flags and no calibrator here by design."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lungrt._version import __version__
from lungrt.core.errors import LungrtError
from lungrt.data.io import atomic_write_bytes
from lungrt.backends.base import INPUT_NAME, OUTPUT_NAME
from lungrt.backends.integrity import (
    CONTENT_KEY,
    SIDECAR_DIGEST,
    file_sha256,
    load_verified_onnx,
    sidecar_digest,
)
from lungrt.backends.tensorrt.flavour import (
    DEFAULT_RTX_TARGETS,
    FLAVOURS,
    Flavour,
    _polygraphy_for,
    gpu_environment,
    import_flavour,
    target_tag,
)
from lungrt.backends.tensorrt.metadata import _read_metadata, metadata_path, stale_reasons


log_ = logging.getLogger(__name__)


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
    """What lungrt asks of TensorRT. The real one is Polygraphy; tests also use a recording fake."""

    def environment(self) -> dict: ...

    def build(
        self,
        onnx_path: Path,
        *,
        strongly_typed: bool,
        input_name: str,
        shapes: dict,
        timing_cache: Path | None,
        workspace_bytes: int,
    ) -> bytes: ...


class PolygraphyBuilder:
    """Builds with Polygraphy's loaders: parse ONNX strongly typed, one optimization profile,
    workspace limit. Standard TensorRT also allows TF32 for FP32 layers (as trtexec does; Polygraphy's
    default is off) and persists a timing cache; TensorRT-RTX targets compute capabilities."""

    def __init__(self, flavour: Flavour | str = "tensorrt", targets: tuple[str, ...] | None = None):
        self.flavour = FLAVOURS[flavour] if isinstance(flavour, str) else flavour
        self.targets = tuple(targets or DEFAULT_RTX_TARGETS) if self.flavour.aot else None

    def environment(self) -> dict:
        trt = import_flavour(self.flavour)
        env = {"flavour": self.flavour.name, "tensorrt": trt.__version__}
        if self.flavour.aot:
            known = {n for n in dir(trt.ComputeCapability) if n.startswith("SM")}
            missing = [t for t in self.targets if f"SM{t.replace('.', '')}" not in known]
            if missing:
                raise LungrtError(
                    f"{self.flavour.module} {trt.__version__} cannot target {', '.join(missing)}; "
                    f"it knows {', '.join(sorted(known))}"
                )
            return {**env, "targets": list(self.targets)}
        gpu = gpu_environment()
        if gpu is None:
            raise LungrtError(
                "standard TensorRT builds on the GPU it will run on, and no NVIDIA GPU is visible; "
                "for RTX GPUs build ahead of time with --backend tensorrt-rtx"
            )
        return {**env, **gpu}

    def build(
        self,
        onnx_path: Path,
        *,
        strongly_typed: bool,
        input_name: str,
        shapes: dict,
        timing_cache: Path | None,
        workspace_bytes: int,
    ) -> bytes:
        from lungrt.core.logs import third_party_logs

        _polygraphy_for(self.flavour)
        with third_party_logs("polygraphy"):
            return self._build(onnx_path, strongly_typed, input_name, shapes, timing_cache, workspace_bytes)

    def _build(self, onnx_path, strongly_typed, input_name, shapes, timing_cache, workspace_bytes) -> bytes:
        from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

        trt = import_flavour(self.flavour)
        network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed)
        profile = Profile().add(input_name, min=shapes["min"], opt=shapes["opt"], max=shapes["max"])
        common = {"profiles": [profile], "memory_pool_limits": {trt.MemoryPoolType.WORKSPACE: workspace_bytes}}
        if self.flavour.aot:
            from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

            caps = [tuple(int(v) for v in t.split(".")) for t in self.targets]
            config = CreateConfigRTX(compute_capabilities=caps, **common)
            return bytes(EngineBytesFromNetwork(network, config=config)())
        load = str(timing_cache) if timing_cache is not None and timing_cache.exists() else None
        config = CreateConfig(load_timing_cache=load, tf32=True, **common)
        save = str(timing_cache) if timing_cache is not None else None
        return bytes(EngineBytesFromNetwork(network, config=config, save_timing_cache=save)())


def plan_path(onnx_path: Path, out_dir: Path, env: dict) -> Path:
    """engines/<variant>.<flavour tag>.plan: one file per variant, flavour and target."""
    stem = onnx_path.name.removesuffix(".onnx")
    if env.get("targets"):
        tag = f"rtx-{target_tag(env['targets'])}"
    else:
        tag = f"trt-sm{str(env.get('compute_capability', 'x')).replace('.', '')}"
    return out_dir / f"{stem}.{tag}.plan"


def timing_cache_path(out_dir: Path, env: dict) -> Path | None:
    """Per TensorRT version and compute capability: a cache from another one is useless or worse."""
    if env.get("targets"):
        return None
    return out_dir / f"timing-{env['flavour']}-{env['tensorrt']}-sm{env['compute_capability'].replace('.', '')}.cache"


def build_engine(
    onnx_path: str | Path,
    out_dir: str | Path = "engines",
    batch: BatchProfile = BatchProfile(),
    workspace_gib: float = 4.0,
    builder: EngineBuilder | None = None,
    rebuild: bool = False,
    log=log_.info,
) -> dict:
    """Build (or reuse) the plan for one precision-variant ONNX file; returns its metadata."""
    from lungrt.export.precision import dtype_census

    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise LungrtError(f"{onnx_path}: ONNX file does not exist")
    builder = builder or PolygraphyBuilder()
    env = builder.environment()
    meta_onnx = load_verified_onnx(onnx_path).meta  # compile only what lungrt wrote and can vouch for
    if "lungrt.core.spec" not in meta_onnx:
        raise LungrtError(f"{onnx_path}: ONNX file has no lungrt metadata (make it with `lungrt export`)")
    plan = plan_path(onnx_path, out_dir, env)
    wanted = {"onnx_hash": meta_onnx[CONTENT_KEY], "batch_profile": [batch.min, batch.opt, batch.max], **env}
    if plan.exists() and metadata_path(plan).exists() and not rebuild:
        existing = _read_metadata(plan)
        if (
            not stale_reasons(existing, wanted)
            and existing.get("plan_hash") == file_sha256(plan)
            and existing.get(SIDECAR_DIGEST) == sidecar_digest(existing)
        ):
            log(f"{plan} is up to date; nothing to build")
            return existing
    size = json.loads(meta_onnx["lungrt.core.spec"])["size"]
    shapes = {k: (n, 1, size, size) for k, n in (("min", batch.min), ("opt", batch.opt), ("max", batch.max))}
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        data = builder.build(
            onnx_path,
            strongly_typed=True,
            input_name=INPUT_NAME,
            shapes=shapes,
            timing_cache=timing_cache_path(out_dir, env),
            workspace_bytes=int(workspace_gib * 2**30),
        )
    except LungrtError:
        raise
    except Exception as e:  # Polygraphy reports parser/builder failures as exceptions with the reason
        raise LungrtError(
            f"{onnx_path}: {env['flavour']} could not build an engine: {str(e).strip().splitlines()[-1][:300]}"
        ) from None
    if not data:
        raise LungrtError(f"{onnx_path}: {env['flavour']} returned an empty engine")
    meta = {
        **wanted,
        "model": json.loads(meta_onnx["lungrt.model"]),
        "weights_hash": meta_onnx.get("lungrt.weights_hash"),
        "precision": meta_onnx.get("lungrt.export.precision", "fp32"),
        "int8_float": meta_onnx.get("lungrt.int8_float"),
        "onnx": str(onnx_path.resolve()),  # for the rebuild hint only: staleness goes by onnx_hash
        "plan": plan.name,
        "plan_hash": hashlib.sha256(data).hexdigest(),
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", 1, size, size]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", 1, size, size]},
        "calibration": json.loads(meta_onnx.get("lungrt.calibration", "null")),
        "dtype_census": dtype_census(onnx_path),
        "strongly_typed": True,
        "engine_bytes": len(data),
        "lungrt_version": __version__,
        "build_seconds": round(time.time() - t0, 2),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    meta[SIDECAR_DIGEST] = sidecar_digest(meta)
    atomic_write_bytes(plan, data)
    atomic_write_bytes(metadata_path(plan), json.dumps(meta, indent=2).encode())
    where = f"for {target_tag(env['targets'])}" if env.get("targets") else f"on {env.get('gpu')}"
    log(
        f"built {plan} ({env['flavour']} {env['tensorrt']}, {meta['precision']}, batch {batch.min}-{batch.max}, "
        f"{where}) "
        f"in {meta['build_seconds']} s, {len(data) / 2**20:.1f} MiB"
    )
    return meta
