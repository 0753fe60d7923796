"""An engine's sidecar metadata: what it was built from and for, sealed by its digest; whether it is stale
(rebuild) or cannot run here (another GPU or TensorRT version), and the command that rebuilds it."""

from __future__ import annotations

import json
from pathlib import Path

from lungrt.core.errors import LungrtError
from lungrt.backends.integrity import (
    SIDECAR_DIGEST,
    ContentMismatch,
    file_sha256,
    sidecar_digest,
)


def metadata_path(plan: Path) -> Path:
    return plan.with_name(plan.name + ".json")


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
