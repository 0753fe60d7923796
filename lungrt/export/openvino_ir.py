"""OpenVINO's side of export: its Core (an optional extra) and an IR written with lungrt's metadata, sealed."""

from __future__ import annotations

import json
from pathlib import Path

from lungrt.backends.integrity import UNSEALED, seal_ir
from lungrt.core.errors import BackendUnavailable


def openvino_core():
    try:
        import openvino as ov
    except ImportError:
        raise BackendUnavailable("openvino is not installed; pip install 'lungrt[openvino]'") from None
    return ov, ov.Core()


def save_sealed_ir(model, meta: dict, xml_path: str | Path) -> str:
    """Save an OpenVINO model as IR with lungrt's metadata in its rt_info (what the ONNX file it came
    from carried is dropped) and seal it with its content hash; returns the hash."""
    import openvino as ov

    from lungrt.data.io import temp_path_for

    xml_path = Path(xml_path)
    rt = model.get_rt_info()
    if "framework" in rt:  # the source ONNX file's metadata, content hash included: not this file's
        del rt["framework"]
    model.set_rt_info(json.dumps(meta, sort_keys=True), ["lungrt", "metadata"])
    model.set_rt_info(UNSEALED, ["lungrt", "content_hash"])
    tmp = temp_path_for(xml_path).with_suffix(".xml")  # OpenVINO names the .bin after it
    try:  # the pair appears under its name only once whole: a crash leaves no IR to reuse
        ov.save_model(model, tmp, compress_to_fp16=False)
        h = seal_ir(tmp)
        tmp.with_suffix(".bin").replace(xml_path.with_suffix(".bin"))
        tmp.replace(xml_path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".bin").unlink(missing_ok=True)
    return h
