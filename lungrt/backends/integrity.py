"""Artifacts checked by content before they run.

Every ONNX file lungrt writes carries, in its own metadata, the SHA-256 of its graph (nodes and
initializers, i.e. the weights' bytes; the metadata itself is outside what is hashed). Every
engine's sidecar carries the SHA-256 of its plan file. Opening either recomputes the hash (about
20 ms for an 8 MB graph): a cached file that fails is made again, a file a user named is refused
in one line. A hash is what parity, build and infer record, so each mask can be matched to the
artifact that was verified.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from lungrt.core.errors import LungrtError

CONTENT_KEY = "lungrt.content_hash"


class ContentMismatch(LungrtError):
    """An artifact whose bytes are not the ones lungrt wrote (edited, corrupted, or made elsewhere)."""


def graph_hash(model) -> str:
    """SHA-256 of an ONNX model's graph (deterministic protobuf bytes), metadata excluded."""
    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()


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
        raise ContentMismatch(f"{path}: records no content hash (not written by this lungrt, or edited); "
                              "make it again with `lungrt export` or `lungrt build`")
    if graph_hash(model) != recorded:
        raise ContentMismatch(f"{path}: its graph or weights do not match the content hash it records "
                              "(corrupted or edited); make it again with `lungrt export` or `lungrt build`")
    return VerifiedOnnx(data, meta, recorded)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
