"""TensorRT engines, both flavours: a thin, standard compile step over Polygraphy, plus the
metadata that makes engines safe to reuse (staleness) and a Triton model-repository export.

- `tensorrt`: standard TensorRT for data-center and other NVIDIA GPUs. Builds on the GPU it will
  run on (the plan is specific to that GPU and TensorRT version); a timing cache speeds rebuilds.
- `tensorrt-rtx`: NVIDIA TensorRT for RTX (GeForce/RTX GPUs such as the RTX 3090). Builds ahead of
  time, without a GPU, for a list of compute capabilities (default SM86, the 3090 class); the
  engine finishes compiling (JIT) on the user's GPU at load. No timing cache on this path: one makes
  the AOT step look for a GPU.

Every precision decision is already in the ONNX graph (precision module), so the engine is always
built strongly typed: the only network kind TensorRT 11 and TensorRT-RTX have. There are no
FP16/INT8 builder flags and no calibrator here by design.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import sys
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
    ContentMismatch,
    file_sha256,
    load_verified_onnx,
    sidecar_digest,
)

log_ = logging.getLogger(__name__)


@dataclass(frozen=True)
class Flavour:
    name: str  # what users type: --backend NAME
    module: str  # the Python module it installs
    extra: str  # pip install 'lungrt[EXTRA]'
    aot: bool  # builds ahead of time for listed compute capabilities, no GPU needed


FLAVOURS = {
    "tensorrt": Flavour("tensorrt", "tensorrt", "trt", aot=False),
    "tensorrt-rtx": Flavour("tensorrt-rtx", "tensorrt_rtx", "rtx", aot=True),
}
DEFAULT_RTX_TARGETS = ("8.6",)  # the RTX 3090 / 30-series class


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


def parse_targets(text: str | None) -> tuple[str, ...]:
    """'sm86,sm89' or '8.6,8.9' -> ('8.6', '8.9')."""
    if not text:
        return DEFAULT_RTX_TARGETS
    out = []
    for item in text.replace(" ", "").split(","):
        digits = item.lower().removeprefix("sm_").removeprefix("sm").replace(".", "")
        if not digits.isdigit() or len(digits) < 2:
            raise LungrtError(f"--target: {item!r} is not a compute capability such as sm86 or 8.6")
        out.append(f"{digits[:-1]}.{digits[-1]}")
    return tuple(dict.fromkeys(out))


def target_tag(targets) -> str:
    return "+".join(f"sm{t.replace('.', '')}" for t in targets)


# -- which TensorRT is here ----------------------------------------------------------------------


def import_flavour(flavour: Flavour):
    """The flavour's TensorRT module, or a LungrtError that says how to install it."""
    try:
        return importlib.import_module(flavour.module)
    except Exception as e:  # missing wheels, or libraries that fail to load
        raise LungrtError(
            f"{flavour.name} does not import ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            f"install it with: pip install 'lungrt[{flavour.extra}]'"
        ) from None


def gpu_environment() -> dict | None:
    """The visible NVIDIA GPU (name, compute capability), or None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def flavour_status(name: str) -> tuple[bool, str]:
    """(can build here, reason) for one flavour."""
    flavour = FLAVOURS[name]
    if importlib.util.find_spec(flavour.module) is None:
        return False, f"{flavour.module} is not installed; pip install 'lungrt[{flavour.extra}]'"
    if importlib.util.find_spec("polygraphy") is None:
        return False, f"polygraphy is missing; pip install 'lungrt[{flavour.extra}]'"
    try:
        trt = import_flavour(flavour)
    except LungrtError as e:
        return False, str(e)
    if flavour.aot:
        gpu = gpu_environment()
        runs = f"runs on {gpu['gpu']}" if gpu else "builds ahead of time; running engines needs an RTX GPU"
        return True, f"{flavour.module} {trt.__version__}: {runs}"
    gpu = gpu_environment()
    if gpu is None:
        return (
            False,
            (
                f"{flavour.module} {trt.__version__} imports but no NVIDIA GPU "
                f"is visible (standard TensorRT builds on the GPU it runs on)"
            ),
        )
    return True, f"{flavour.module} {trt.__version__} on {gpu['gpu']}"


def choose_flavour(backend: str) -> Flavour:
    """'tensorrt' / 'tensorrt-rtx' as asked, or for 'auto' the standard flavour where it can build
    (a GPU is present), else TensorRT-RTX where it is installed."""
    if backend in FLAVOURS:
        ok, why = flavour_status(backend)
        if not ok:
            raise LungrtError(f"--backend {backend}: {why}")
        return FLAVOURS[backend]
    for name in FLAVOURS:
        if flavour_status(name)[0]:
            return FLAVOURS[name]
    raise LungrtError(
        "no TensorRT flavour can build here: " + "; ".join(f"{n}: {flavour_status(n)[1]}" for n in FLAVOURS)
    )


def _polygraphy_for(flavour: Flavour) -> None:
    """Point Polygraphy at the flavour's module. Polygraphy binds its TensorRT module when its
    backend modules are first imported, so one process serves one flavour."""
    import polygraphy.config as pconfig

    want = flavour.aot
    if "polygraphy.backend.trt.loader" in sys.modules and pconfig.USE_TENSORRT_RTX != want:
        raise LungrtError(
            f"this process already loaded the other TensorRT flavour through Polygraphy; "
            f"build {flavour.name} engines in a separate process"
        )
    pconfig.USE_TENSORRT_RTX = want


# -- building ------------------------------------------------------------------------------------


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


def metadata_path(plan: Path) -> Path:
    return plan.with_name(plan.name + ".json")


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


def _read_metadata(plan: Path) -> dict:
    try:
        meta = json.loads(metadata_path(plan).read_text())
    except (OSError, ValueError) as e:
        raise LungrtError(
            f"{plan}: unreadable engine metadata {metadata_path(plan).name} ({type(e).__name__}); "
            "rebuild it with `lungrt build`"
        ) from None
    if not isinstance(meta, dict) or "model" not in meta:
        raise LungrtError(
            f"{plan}: engine metadata {metadata_path(plan).name} is not lungrt's; rebuild it with `lungrt build`"
        )
    return meta


def stale_reasons(meta: dict, current: dict) -> list[str]:
    """Why an existing plan is not the one wanted now: other flavour, TensorRT, targets or GPU, ONNX."""
    reasons = []
    for key, what in (
        ("flavour", "TensorRT flavour"),
        ("tensorrt", "TensorRT version"),
        ("targets", "target list"),
        ("gpu", "GPU"),
        ("compute_capability", "compute capability"),
        ("onnx_hash", "ONNX graph"),
        ("batch_profile", "batch profile"),
    ):
        if key in current and meta.get(key, "tensorrt" if key == "flavour" else None) != current[key]:
            reasons.append(f"{what} {meta.get(key)} != {current[key]}")
    return reasons


def runtime_reasons(meta: dict, installed_version: str, gpu: dict) -> list[str]:
    """Why a plan cannot run with this TensorRT on this GPU."""
    reasons = []
    if meta.get("tensorrt") != installed_version:
        reasons.append(
            f"built with {meta.get('flavour', 'tensorrt')} {meta.get('tensorrt')}, installed {installed_version}"
        )
    if meta.get("targets"):
        if gpu["compute_capability"] not in meta["targets"]:
            reasons.append(
                f"built for {', '.join(meta['targets'])}, this GPU ({gpu['gpu']}) is {gpu['compute_capability']}"
            )
    else:
        for key, what in (("gpu", "GPU"), ("compute_capability", "compute capability")):
            if meta.get(key) != gpu[key]:
                reasons.append(f"{what} {meta.get(key)} != {gpu[key]}")
    return reasons


def rebuild_command(meta: dict) -> str:
    flavour = meta.get("flavour", "tensorrt")
    target = f" --target {','.join(meta['targets'])}" if meta.get("targets") else ""
    return f"`lungrt build --onnx {meta.get('onnx', 'MODEL.onnx')} --backend {flavour}{target} --rebuild`"


def read_plan_metadata(plan: Path) -> dict:
    """The sidecar of a plan whose bytes are the ones it was built as (plan_hash), else a
    LungrtError saying what to do. A plan carries no trace of the ONNX path it came from: it runs
    wherever it is copied, with its sidecar beside it."""
    plan = Path(plan)
    if not plan.is_file():
        raise LungrtError(f"{plan}: engine file does not exist")
    if not metadata_path(plan).exists():
        raise LungrtError(
            f"{plan}: its metadata {metadata_path(plan).name} is not beside it; copy that file from the "
            f"build machine next to {plan.name} (or rebuild with `lungrt build`)"
        )
    meta = _read_metadata(plan)
    if "plan_hash" not in meta:
        raise LungrtError(
            f"{plan}: built by an older lungrt (no plan hash in {metadata_path(plan).name}); rebuild it "
            f"with {rebuild_command(meta)}"
        )
    if file_sha256(plan) != meta["plan_hash"]:
        raise ContentMismatch(
            f"{plan}: its bytes do not match the plan hash in {metadata_path(plan).name} (corrupted, "
            f"or another build's file); rebuild it with {rebuild_command(meta)}"
        )
    if meta.get(SIDECAR_DIGEST) != sidecar_digest(meta):
        raise ContentMismatch(
            f"{plan}: {metadata_path(plan).name} does not match the digest it records (its spec, QC "
            f"bounds or precision were edited, or an older lungrt wrote it); rebuild it with "
            f"{rebuild_command(meta)}"
        )
    return meta


def check_plan_usable(plan: Path, installed_version: str, gpu: dict, meta: dict | None = None) -> dict:
    """Metadata of a plan (`meta`: as `read_plan_metadata` already returned it), or a LungrtError
    saying why it cannot run here and how to rebuild."""
    meta = meta if meta is not None else read_plan_metadata(plan)
    reasons = runtime_reasons(meta, installed_version, gpu)
    if reasons:
        raise LungrtError(
            f"{plan}: cannot run here ({'; '.join(reasons)}); install {meta.get('flavour', 'tensorrt')} "
            f"{meta.get('tensorrt')} exactly, or rebuild with {rebuild_command(meta)}"
        )
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

    return "\n".join(
        [
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
            (
                f'parameters {{\n  key: "lungrt_preprocess"\n  value: {{ string_value: '
                f"{json.dumps(json.dumps(meta['model']['preprocess'], sort_keys=True))} "
                f"}}\n}}"
            ),
            "",
        ]
    )


def export_triton(plan: str | Path, repo: str | Path, name: str | None = None) -> Path:
    """DIR/<name>/config.pbtxt + DIR/<name>/1/model.plan, servable by Triton unchanged."""
    import shutil

    plan = Path(plan)
    if not metadata_path(plan).exists():
        raise LungrtError(f"{plan}: no engine metadata ({metadata_path(plan).name}); build it with `lungrt build`")
    meta = _read_metadata(plan)
    if meta.get("flavour", "tensorrt") != "tensorrt":
        raise LungrtError(
            f"{plan}: a {meta['flavour']} engine; Triton's tensorrt_plan backend runs standard TensorRT "
            "plans only. Serve the ONNX variant with Triton's onnxruntime backend, or build with "
            "--backend tensorrt on the serving GPU"
        )
    try:
        name = name or f"lungrt_{meta['model']['name'].replace('-', '_')}_{meta['precision']}"
        config = triton_config(name, meta)
    except (KeyError, TypeError, ValueError) as e:
        raise LungrtError(f"{plan}: engine metadata lacks {e}; rebuild it with `lungrt build`") from None
    model_dir = Path(repo) / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(plan, model_dir / "1" / "model.plan")
    (model_dir / "config.pbtxt").write_text(config)
    return model_dir
