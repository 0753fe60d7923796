"""Checkpoints: safetensors weights with JSON metadata in the safetensors header.

One file carries the model name and config, the preprocessing spec, the data fingerprint, the
metrics and the lungrt version. Loading never unpickles code: safetensors, or for users' own
`.pt/.pth` state_dicts `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from lungrt.core.errors import CheckpointError
from lungrt.data.io import temp_path_for
from lungrt.models import REGISTRY, build_model
from lungrt.core.modelinfo import ModelInfo  # noqa: F401  (re-exported: where checkpoints' callers look for it)
from lungrt.core.spec import DEFAULT_CONVENTION, PreprocessSpec, check_convention

META_KEY = "lungrt"
MAX_WIDTH = 256


@dataclass
class LoadedModel:
    model: nn.Module
    info: ModelInfo

    @property
    def spec(self) -> PreprocessSpec:
        return self.info.spec


def save_checkpoint(path: str | Path, model: nn.Module, info: ModelInfo, dtype: torch.dtype = torch.float32) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    meta = {META_KEY: json.dumps(info.to_dict(), sort_keys=True), "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = temp_path_for(path)
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)  # atomic: a crash mid-save keeps the previous best
    return path


def read_info(path: str | Path) -> ModelInfo:
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, Exception) as e:
        raise CheckpointError(path, f"not a readable safetensors file ({e})") from None
    if META_KEY not in meta:
        raise CheckpointError(path, "safetensors file has no lungrt metadata; pass --arch NAME to load bare weights")
    try:
        return ModelInfo.from_dict(json.loads(meta[META_KEY]), source=str(path))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(path, f"malformed lungrt metadata ({type(e).__name__}: {e})") from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(path, "file does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(path, f"not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            path, f"not a weights-only PyTorch state_dict ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    for key in ("state_dict", "model_state_dict", "model"):  # common training-script wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(path, "does not hold a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}  # DataParallel prefix


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Strict load with an error that lists what does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or misshaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {label} keys (e.g. {', '.join(keys[:3])})")
        if misshaped:
            k = misshaped[0]
            parts.append(
                f"{len(misshaped)} mis-shaped (e.g. {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)})"
            )
        raise CheckpointError(path, "weights do not fit the model: " + "; ".join(parts))
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise CheckpointError(path, f"weights contain NaN or infinite values (e.g. {bad})")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def load_checkpoint(path: str | Path) -> LoadedModel:
    path = Path(path)
    info = read_info(path)
    if info.name not in REGISTRY:
        raise CheckpointError(path, f"unknown model {info.name!r} in metadata")
    if not 1 <= info.width <= MAX_WIDTH:  # checked before building: a huge width allocates gigabytes
        raise CheckpointError(path, f"model width {info.width} in metadata is out of range (1..{MAX_WIDTH})")
    model = build_model(info.name, info.width)
    load_weights_into(model, _read_state_dict(path), path)
    return LoadedModel(model.eval(), info)


def load_bare_weights(path: str | Path, arch: str, width: int = 16, spec: PreprocessSpec | None = None) -> LoadedModel:
    """A user's own state_dict (.pt/.pth weights only, or safetensors) into a registry model."""
    path = Path(path)
    if arch not in REGISTRY:
        raise CheckpointError(path, f"unknown --arch {arch!r}; choose from {', '.join(REGISTRY)}")
    model = build_model(arch, width)
    load_weights_into(model, _read_state_dict(path), path)
    return LoadedModel(model.eval(), ModelInfo(arch, width, spec or PreprocessSpec(), source=str(path)))


def shipped_checkpoint(name: str, convention: str | None = None) -> Path | None:
    """The shipped weights of a registry model for a mask convention: `NAME.safetensors` segments lung
    fields (the default convention), `NAME.whole-lung.safetensors` whole lungs."""
    suffix = "" if (convention or DEFAULT_CONVENTION) == DEFAULT_CONVENTION else f".{check_convention(convention)}"
    p = resources.files("lungrt") / "weights" / f"{name}{suffix}.safetensors"
    return Path(str(p)) if p.is_file() else None


def resolve_model(ref: str, arch: str | None = None, width: int = 16, convention: str | None = None) -> LoadedModel:
    """A registry name (shipped weights, for `convention`), a lungrt checkpoint, or bare weights with --arch."""
    if ref in REGISTRY and not Path(ref).exists():
        ckpt = shipped_checkpoint(ref, convention)
        if ckpt is None:
            raise CheckpointError(
                ref, f"no shipped {convention or DEFAULT_CONVENTION} weights for this model in the installed package"
            )
        return load_checkpoint(ckpt)
    path = Path(ref)
    if path.is_dir() and (path / "model.safetensors").exists():  # a training run folder
        path = path / "model.safetensors"
    if arch:
        return load_bare_weights(path, arch, width)
    if path.suffix != ".safetensors":
        raise CheckpointError(path, "not a lungrt checkpoint; for a plain state_dict pass --arch NAME")
    return load_checkpoint(path)


def weights_hash(model: nn.Module) -> str:
    """Hash of the FP32 weights: identifies a model for caches and engine metadata."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu").float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
