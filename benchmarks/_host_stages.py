"""Worker of `infer_stages.py`: times the host stages of `lungrt infer` for one image at a time
(decode, preprocess, mask and measure, encode the mask, write it) in core-milliseconds
(`time.process_time`: every thread of this process, OpenCV's included), on probabilities the
parent computed once, so no model runs here and no model's threads spin beside the stages.

Runs under whichever `lungrt` is first on PYTHONPATH: the working tree, or an older release
unpacked by the parent, so that both pipelines are timed on the same files in the same minute.
Only names both have are used.

    python benchmarks/_host_stages.py CONFIG.json   # prints one JSON line
"""

from __future__ import annotations

import inspect
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from lungrt.core.spec import PreprocessSpec
from lungrt.data.io import atomic_write_bytes, read_xray
from lungrt.inference import infer
from lungrt.inference.qc import QCThresholds

STAGES = ("decode", "preprocess", "mask_and_measure", "encode_png", "write")


def encoder():
    """What this release writes for a mask by default: the 1-bit PNG where it has one."""
    try:
        from lungrt.data.io import encode_mask_png1

        return encode_mask_png1
    except ImportError:
        from lungrt.inference import measure

        return lambda mask: measure._png(mask, measure._PNG_FAST)


def reader(spec):
    """How this release's infer reads an input it draws no overlay for: where it can, a native
    detector DICOM is reduced to the network's size while read (its area resize then counts as
    decoding, not preprocessing)."""
    if "reduce_for" in inspect.signature(read_xray).parameters:
        return lambda path: read_xray(path, reduce_for=spec)
    return read_xray


def batch_qc(probs: np.ndarray, qc, shapes: list) -> list:
    """A batch's QC numbers computed together, as infer does where this release can (per image,
    inside `measure`, where it cannot: None each)."""
    many = getattr(infer, "qc_features_many", None) or getattr(_measure_module(), "qc_features_many", None)
    return many(list(probs), qc.shape, shapes) if many else [None] * len(probs)


def host_stage_ms(files: list[str], probs: np.ndarray, spec, qc, out_dir: Path, batch: int = 8) -> dict:
    encode, read = encoder(), reader(spec)
    spent = dict.fromkeys(STAGES, 0.0)
    pixels = 0
    shapes = [read_xray(f).shape for f in files]  # untimed: infer has each batch's X-rays in hand
    feats: list = []
    for i, (f, p) in enumerate(zip(files, probs)):
        clock = [time.process_time()]
        xr = read(f)
        clock.append(time.process_time())
        spec.apply_xray(xr)
        clock.append(time.process_time())
        if i % batch == 0:  # the batch's QC, charged to its first image's mask-and-measure
            feats = batch_qc(probs[i : i + batch], qc, shapes[i : i + batch])
        given = [feats[i % batch]] if feats[i % batch] is not None else []
        m = infer.measure(xr, p, spec, True, qc, *([False, *given] if given else []))
        clock.append(time.process_time())
        data = encode(m.mask)
        clock.append(time.process_time())
        atomic_write_bytes(out_dir / (Path(f).stem + ".png"), data, durable=False)
        clock.append(time.process_time())
        for stage, t0, t1 in zip(STAGES, clock, clock[1:]):
            spent[stage] += t1 - t0
        pixels += xr.shape[0] * xr.shape[1]
    ms = {k: 1000 * v / len(files) for k, v in spent.items()}
    ms["megapixels"] = pixels / len(files) / 1e6
    return ms


def end_to_end(cfg: dict) -> dict:
    """`lungrt infer`'s loop against the bare model, interleaved (this release's endtoend)."""
    from lungrt.build.resolve import open_runner
    from lungrt.benchmark import endtoend

    if cfg.get("model"):  # the model's recorded CPU choice (this release's resolver)
        from lungrt.models.checkpoint import resolve_model

        runner = open_runner(resolve_model(cfg["model"]))
    else:
        runner = open_runner(onnx=cfg["onnx"], backend="openvino", precision="fp32")
    x = np.load(cfg["batch_input"])
    items = infer.collect_inputs([cfg["folder"]])
    chunks = max(1, len(items) // (2 * len(x)))
    pool = {"pool": cfg["pool"]} if cfg.get("pool") else {}  # older releases have threads only
    if not hasattr(endtoend, "_infer_part"):  # an older release's ratio: warm infer up as this one's does itself
        with tempfile.TemporaryDirectory() as warm:
            infer.run_infer(runner, items[: len(x)], warm, infer.InferOptions(batch_size=len(x), **pool))
    return endtoend.interleaved_ratio(runner, items, x, len(x), passes=2, chunks=chunks, **pool)


def main() -> None:
    cv2.setNumThreads(1)  # one core per stage, as the table; infer's helpers run OpenCV so
    cfg = json.loads(Path(sys.argv[1]).read_text())
    if cfg.get("end_to_end"):
        print(json.dumps(end_to_end(cfg["end_to_end"])))
        return
    spec, qc = PreprocessSpec.from_dict(cfg["spec"]), QCThresholds.from_dict(cfg["qc"])
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    rows = {
        name: host_stage_ms(files, np.load(cfg["probs"][name]), spec, qc, out, cfg.get("batch", 8))
        for name, files in cfg["sets"].items()
    }
    print(json.dumps(rows))


if __name__ == "__main__":
    main()


def _measure_module():
    """Where this release keeps one image's measuring (infer.py itself in older releases)."""
    try:
        from lungrt.inference import measure

        return measure
    except ImportError:
        return infer
