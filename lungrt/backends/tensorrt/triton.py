"""A built plan as a Triton model (config.pbtxt + 1/model.plan), from its sidecar metadata."""

from __future__ import annotations

import json
from pathlib import Path

from lungrt.core.errors import LungrtError
from lungrt.backends.tensorrt.metadata import _read_metadata, metadata_path


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
