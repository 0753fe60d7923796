"""`lungrt build`: the deployable artefact for a model on the best backend here.

TensorRT when it is usable (a plan built strongly typed from the precision-variant ONNX), else the
ONNX Runtime variant itself. `--precision auto` builds every candidate, gates each with the parity
check on validation images, times the ones that pass, and keeps the fastest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


from .checkpoint import LoadedModel
from .data import discover_pairs, select_split
from .doctor import tensorrt_status
from .engine import BatchProfile, build_engine
from .errors import LungrtError
from .parity import GATES, apply_gate, compare, throughput
from .export import reference_inputs
from .phantoms import write_phantom_dataset
from .precision import PRECISIONS
from .runners import OnnxRuntimeRunner, Runner, TorchRunner
from .variants import make_variant

AUTO_VAL_IMAGES = 48


@dataclass
class Built:
    backend: str
    precision: str
    path: Path  # .plan for TensorRT, .onnx for ONNX Runtime
    notes: dict


def choose_backend(backend: str, log=print) -> str:
    usable, why = tensorrt_status()
    if backend == "tensorrt" and not usable:
        raise LungrtError(f"--backend tensorrt: {why}")
    if backend == "auto":
        if usable:
            return "tensorrt"
        log(f"TensorRT unavailable ({why.split(';')[0]}); building the ONNX Runtime variant instead")
        return "onnxruntime"
    if backend not in ("tensorrt", "onnxruntime"):
        raise LungrtError(f"unknown backend {backend!r}; use auto, tensorrt or onnxruntime")
    return backend


def build_one(loaded: LoadedModel, precision: str, backend: str, out_dir: Path, calib: Path | None, method: str,
              val_pairs, batch: BatchProfile, workspace: float, rebuild: bool, log=print) -> Built:
    variant = make_variant(loaded, precision, folder=out_dir, calib_dir=calib, method=method, val_pairs=val_pairs, log=log)
    if backend == "onnxruntime":
        return Built(backend, precision, variant.path, variant.notes)
    meta = build_engine(variant.path, out_dir, batch, workspace, rebuild=rebuild, log=log)
    plan = out_dir / f"{variant.path.name.removesuffix('.onnx')}.plan"
    return Built(backend, precision, plan, {**variant.notes, "engine": meta})


def open_built(b: Built) -> Runner:
    if b.backend == "tensorrt":
        from .tensorrt_runner import TensorRTRunner

        return TensorRTRunner(b.path)
    return OnnxRuntimeRunner(b.path)


def validation_pairs(data: Path | None, limit: int = AUTO_VAL_IMAGES):
    """Labelled validation images (never test) for gating; phantoms when no data is given."""
    if data is None:
        return None
    pairs = select_split(data, "val")
    step = max(1, len(pairs) // limit)
    return pairs[::step][:limit]


def build_auto(loaded: LoadedModel, backend: str, out_dir: Path, calib: Path | None, method: str, data: Path | None,
               batch: BatchProfile, workspace: float, rebuild: bool, log=print) -> dict:
    """Every candidate precision, gated on validation images and timed; the fastest passing wins."""
    val = validation_pairs(data)
    if val is None:
        folder = write_phantom_dataset(out_dir / "auto-phantoms", 16, size=loaded.spec.size, seed=77)
        val = discover_pairs(folder).pairs
    x = reference_inputs(loaded.spec, batch.opt)
    reference = TorchRunner(loaded)
    candidates = []
    for precision in PRECISIONS:
        log(f"candidate {precision}: building")
        b = build_one(loaded, precision, backend, out_dir, calib, method, val, batch, workspace, rebuild, log)
        with open_built(b) as runner:
            summary = compare(reference, runner, val)["summary"]
            gate = apply_gate(summary, GATES[precision])
            speed = throughput(runner, x, seconds=3.0)
        summary.pop("worst", None)
        candidates.append({"precision": precision, "path": str(b.path), "gate": gate, "parity": summary,
                           "img_per_s": speed, "notes": b.notes})
        log(f"candidate {precision}: agreement {summary['mask_agreement']:.5f}, "
            f"{'passes' if gate['passed'] else 'FAILS'} its gate, {speed:.1f} img/s at batch {batch.opt}")
    passing = [c for c in candidates if c["gate"]["passed"]]
    if not passing:
        raise LungrtError("no precision variant passed its parity gate; see the report")
    choice = max(passing, key=lambda c: c["img_per_s"])
    report = {"model": loaded.info.name, "backend": backend, "batch_for_timing": batch.opt,
              "validation_images": len(val), "validation": str(data) if data else "synthetic phantoms",
              "candidates": candidates, "choice": choice["precision"], "path": choice["path"]}
    stem = out_dir / f"{loaded.info.name}-auto"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    stem.with_suffix(".md").write_text(auto_report_markdown(report))
    report["report"] = str(stem.with_suffix(".md"))
    return report


def auto_report_markdown(r: dict) -> str:
    lines = [f"### `--precision auto` for {r['model']} on {r['backend']}",
             f"Gated on {r['validation_images']} validation images ({r['validation']}); timed at batch {r['batch_for_timing']}.", "",
             "| candidate | mask agreement | task Dice drop | gate | img/s |", "|---|---|---|---|---|"]
    for c in r["candidates"]:
        drop = c["parity"].get("dice_drop")
        lines.append(f"| {c['precision']} | {c['parity']['mask_agreement']:.5f} | "
                     f"{'' if drop is None else f'{drop:+.5f}'} | {'pass' if c['gate']['passed'] else 'FAIL'} | {c['img_per_s']:.1f} |")
    lines += ["", f"Chosen: **{r['choice']}** (`{r['path']}`)", ""]
    return "\n".join(lines)
