"""Artifacts checked by content before they run.

One digest covers everything that can change a mask. Every ONNX file lungrt writes carries, in its own
metadata, the SHA-256 of its graph (nodes and initializers, i.e. the weights' bytes) and of every other
metadata entry (the model card with its QC thresholds and reference weights' hash, the preprocessing spec
with its mask convention, the precision, the calibration), keys sorted: an edited `mean` or QC bound is an
edited file. Every OpenVINO IR (.xml + .bin: the INT8 that NNCF makes for OpenVINO) carries in its rt_info
the SHA-256 of both files' bytes (lungrt's metadata is in the .xml), taken with that one value zeroed. Every
engine's sidecar carries the SHA-256 of its plan file and a digest of the plan's hash with every other
sidecar entry (`sidecar_digest`). Opening either recomputes the hash (about
20 ms for an 8 MB graph): a cached file that fails is made again, a file a user named is refused
in one line. A hash is what parity, build and infer record, so each mask can be matched to the
artifact that was verified.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from lungrt.core.errors import LungrtError

CONTENT_KEY = "lungrt.content_hash"
IR_SUFFIX = ".xml"  # an OpenVINO IR, its weights beside it in .bin
# where an IR records its hash and lungrt's metadata (rt_info path lungrt/...), as OpenVINO writes them
_IR_HASH = re.compile(rb'(<lungrt>\s*<content_hash value=")([0-9a-f]{64})(")')
_IR_META = re.compile(rb'<lungrt>.*?<metadata value="([^"]*)"', re.S)
UNSEALED = "0" * 64


class ContentMismatch(LungrtError):
    """An artifact whose bytes are not the ones lungrt wrote (edited, corrupted, or made elsewhere)."""


def graph_hash(model) -> str:
    """SHA-256 of an ONNX model's graph (deterministic protobuf bytes) and of its metadata entries (keys
    sorted, the recorded hash itself left out): canonical, so the same network and card give the same digest."""
    h = hashlib.sha256(model.graph.SerializeToString(deterministic=True))
    for key, value in sorted((p.key, p.value) for p in model.metadata_props if p.key != CONTENT_KEY):
        h.update(b"\x00" + key.encode() + b"\x00" + value.encode())
    return h.hexdigest()


SIDECAR_DIGEST = "sidecar_digest"
# what a sidecar may hold that decides nothing about a mask (where and when it was built, how long it took)
SIDECAR_NOTES = ("onnx", "build_seconds", "built_at")


def sidecar_digest(meta: dict) -> str:
    """SHA-256 of an engine sidecar's entries (the plan's hash among them), canonical JSON, without the
    digest itself and the build notes: the spec, QC bounds, precision, model card and profile it records."""
    kept = {k: v for k, v in meta.items() if k != SIDECAR_DIGEST and k not in SIDECAR_NOTES}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(model) -> str:
    """Record the graph's hash in the model's metadata (call last, just before saving)."""
    h = graph_hash(model)
    for p in model.metadata_props:
        if p.key == CONTENT_KEY:
            p.value = h
            return h
    model.metadata_props.add(key=CONTENT_KEY, value=h)
    return h


@dataclass
class VerifiedOnnx:
    data: bytes  # the file's bytes, as checked: what a runner should load
    meta: dict
    content_hash: str
    weights: bytes = b""  # an IR's .bin (an ONNX file holds its weights)


def load_verified(path: str | Path) -> VerifiedOnnx:
    """An ONNX file or OpenVINO IR (by suffix), checked by content."""
    return load_verified_ir(path) if Path(path).suffix == IR_SUFFIX else load_verified_onnx(path)


def remove_artifact(path: str | Path) -> None:
    """Delete an ONNX file, or an IR with its .bin."""
    path = Path(path)
    path.unlink(missing_ok=True)
    if path.suffix == IR_SUFFIX:
        path.with_suffix(".bin").unlink(missing_ok=True)


def ir_hash(xml: bytes, weights: bytes) -> str:
    """SHA-256 of an IR: its .xml with the recorded hash zeroed, then its .bin."""
    h = hashlib.sha256(_IR_HASH.sub(lambda m: m[1] + UNSEALED.encode() + m[3], xml, count=1))
    h.update(weights)
    return h.hexdigest()


def seal_ir(xml_path: str | Path) -> str:
    """Write the IR's hash over the zeroed value it was saved with (`save_sealed_ir` in
    backends.openvino saves it so); the .xml keeps its length."""
    from lungrt.data.io import atomic_write_bytes

    xml_path = Path(xml_path)
    xml = xml_path.read_bytes()
    if not _IR_HASH.search(xml):
        raise LungrtError(f"{xml_path}: saved without a lungrt content-hash slot")
    h = ir_hash(xml, xml_path.with_suffix(".bin").read_bytes())
    atomic_write_bytes(xml_path, _IR_HASH.sub(lambda m: m[1] + h.encode() + m[3], xml, count=1))
    return h


def load_verified_ir(path: str | Path) -> VerifiedOnnx:
    """An OpenVINO IR whose .xml and .bin hash to what its rt_info records, else ContentMismatch."""
    import html

    path = Path(path)
    weights_path = path.with_suffix(".bin")
    if not path.is_file() or not weights_path.is_file():
        raise LungrtError(f"{path}: OpenVINO IR does not exist (needs {path.name} and {weights_path.name})")
    xml, weights = path.read_bytes(), weights_path.read_bytes()
    recorded, meta = _IR_HASH.search(xml), _IR_META.search(xml)
    if recorded is None or meta is None:
        raise ContentMismatch(
            f"{path}: records no lungrt content hash (not written by this lungrt, or edited); "
            "make it again with `lungrt build`"
        )
    if recorded[2].decode() != ir_hash(xml, weights):
        raise ContentMismatch(
            f"{path}: its graph or weights (.bin) do not match the content hash it records "
            "(corrupted or edited); make it again with `lungrt build`"
        )
    try:
        meta = json.loads(html.unescape(meta[1].decode()))
    except ValueError:
        raise ContentMismatch(f"{path}: its lungrt metadata does not parse") from None
    return VerifiedOnnx(xml, meta, recorded[2].decode(), weights)


def load_verified_onnx(path: str | Path) -> VerifiedOnnx:
    """An ONNX file whose graph hashes to what its metadata records, else ContentMismatch saying
    why. Unreadable files raise LungrtError."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise LungrtError(f"{path}: ONNX file does not exist")
    data = path.read_bytes()
    try:
        model = onnx.load_from_string(data)
    except Exception as e:  # protobuf raises its own errors on garbage
        raise LungrtError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None
    meta = {p.key: p.value for p in model.metadata_props}
    recorded = meta.get(CONTENT_KEY)
    if recorded is None:
        raise ContentMismatch(
            f"{path}: records no content hash (not written by this lungrt, or edited); "
            "make it again with `lungrt export` or `lungrt build`"
        )
    if graph_hash(model) != recorded:
        raise ContentMismatch(
            f"{path}: its graph, weights or lungrt metadata (spec, QC, precision) do not match the "
            "content hash it records (corrupted or edited); make it again with `lungrt export` or "
            "`lungrt build`"
        )
    return VerifiedOnnx(data, meta, recorded)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
