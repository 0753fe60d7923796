"""Making (and reusing) the precision variants of a model as ONNX files, with the INT8 accuracy
search: if INT8 fails its parity gate on validation images, the blocks that cause it are found by
sensitivity and left unquantized until it passes."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lungrt.core.cache import cache_root
from lungrt.core.progress import working_on
from lungrt.core.hardware import cpu_tag
from lungrt.models.checkpoint import LoadedModel, weights_hash
from lungrt.core.errors import LungrtError
from lungrt.export.onnx import EXPORT_REVISION, export_onnx
from lungrt.evaluation.parity import GATES, apply_gate, compare
from lungrt.export.precision import (
    DEFAULT_CALIBRATION_IMAGES, PRECISIONS, CalibrationSet, load_calibration_set, make_fp16, make_int8,
    make_int8_fp16, make_int8_nncf, make_int8_nncf_mixed, make_int8_ort_cpu, node_block, quantizable_nodes,
    save_derived_int8,
)
from lungrt.backends.base import Runner, onnx_metadata
from lungrt.backends.integrity import ContentMismatch, load_verified_onnx
from lungrt.backends.onnxruntime import OnnxRuntimeRunner
from lungrt.backends.pytorch import TorchRunner

SENSITIVITY_IMAGES = 32  # validation images used by the INT8 exclusion search


def _open_openvino(path: Path) -> Runner:
    from lungrt.backends.openvino import OpenVinoRunner  # an optional extra

    return OpenVinoRunner(path)


@dataclass(frozen=True)
class Int8Recipe:
    """How the INT8 graph for one engine is made, and the runner that executes it as deployed:
    the gate (and the exclusion search) measures exactly what will run."""

    tag: str  # in the file name, before the calibration method
    quantize: Callable  # (fp32, out, calib, method, exclude=..., cache_dir=...) -> dict
    open: Callable[[Path], Runner]
    method: str | None = None  # a recipe with its own calibration (NNCF) ignores --method
    # the calibration used when none is asked for: entropy for TensorRT's symmetric Q/DQ (what
    # TensorRT's own calibrator does); min-max for ONNX Runtime's CPU Q/DQ (quantize_static's
    # default; entropy's histograms took 101 of 277 s of msag-unet's CPU build and gate the same)
    default_method: str = "entropy"
    # CPU engines pick INT8 kernels by instruction set (OpenVINO's AMX and AVX-512 VNNI kernels gave
    # mask agreement 0.998 and 0.75 on one gsconv-unet file), so their gate holds for the CPU it ran
    # on: the file is per CPU, and a cache shared by other CPUs makes and gates its own
    per_cpu: bool = False
    # another whole-graph quantization tried before any block is left in float (same signature as
    # `quantize`): keeping everything INT8 is faster than the float islands exclusions leave
    fallback: Callable | None = None
    # exclusion sets derived from the one whole-graph file by graph surgery (`dequantize_nodes`),
    # instead of quantizing again: for recipes whose calibration is not cached (NNCF)
    derive: bool = False


INT8_RECIPES = {
    "portable": Int8Recipe("", make_int8, OnnxRuntimeRunner),  # TensorRT's form, checked on ONNX Runtime
    "onnxruntime": Int8Recipe("ortcpu-", make_int8_ort_cpu, OnnxRuntimeRunner, per_cpu=True, default_method="minmax"),
    "openvino": Int8Recipe("", make_int8_nncf, _open_openvino, method="nncf", per_cpu=True, fallback=make_int8_nncf_mixed,
                           derive=True),
}
# make_variant's `target` (an engine, or a backend name) -> the INT8 recipe it gets
TARGET_RECIPES = {"portable": "portable", "cpu": "portable", "tensorrt": "portable", "tensorrt-rtx": "portable",
                  "onnxruntime": "onnxruntime", "openvino": "openvino"}


@dataclass
class Variant:
    precision: str
    path: Path
    notes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Made:
    """What a cached variant must have been made from: hashed once per `make_variant` call (hashing
    the weights is the costly part, and every variant file is checked against it)."""

    stem: str  # <model>-<weights hash>
    weights: str
    info: dict

    @classmethod
    def of(cls, loaded: LoadedModel) -> "_Made":
        h = weights_hash(loaded.model)
        return cls(f"{loaded.info.name}-{h}", h, json.loads(json.dumps(loaded.info.to_dict())))

    def file(self, folder: Path, precision: str, calib: CalibrationSet | None = None, method: str = "") -> Path:
        if precision == "int8":
            return folder / f"{self.stem}.int8-{method}-{calib.digest}.onnx"  # method: recipe tag + method
        return folder / f"{self.stem}.{precision}.onnx"

    def reusable(self, path: Path) -> bool:
        """A cached variant is used only when its graph hashes to the content hash it records and it
        was made from these very weights and model metadata (spec, QC thresholds); a file cut short
        (crash, full disk), corrupted or edited, or another model saved under the name is made again."""
        if not path.exists():
            return False
        try:
            meta = load_verified_onnx(path).meta  # by content: a corrupted or edited cache file is made again
            ok = (meta.get("lungrt.weights_hash") == self.weights and json.loads(meta.get("lungrt.model", "{}")) == self.info
                  and meta.get("lungrt.export.revision") == EXPORT_REVISION)  # made by an older exporter: remake
        except ContentMismatch as e:
            logging.getLogger(__name__).warning("%s; making it again", e)
            ok = False
        except Exception:
            ok = False
        if not ok:
            path.unlink(missing_ok=True)
        return ok


def make_variant(loaded: LoadedModel, precision: str, folder: str | Path | None = None, calib_dir: str | Path | None = None,
                 method: str | None = None, val_pairs=None, calib_count: int = DEFAULT_CALIBRATION_IMAGES,
                 cache_dir: str | Path | None = None, log=logging.getLogger(__name__).info, target: str = "portable") -> Variant:
    """The ONNX file of one precision variant, made once and reused while the weights (and, for
    INT8, calibration set, method and recipe) are unchanged.

    `target` picks the INT8 recipe (TARGET_RECIPES): the portable Q/DQ graph; "onnxruntime" and
    "openvino" their CPU forms; "tensorrt" the portable graph with FP16 for everything that is not
    INT8 (`make_int8_fp16`). With `val_pairs`, INT8 is gated on them by the runner that will
    execute it, leaving the most sensitive blocks in float until it passes."""
    if precision not in PRECISIONS:
        raise LungrtError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if target not in TARGET_RECIPES:
        raise LungrtError(f"unknown variant target {target!r}; use {', '.join(TARGET_RECIPES)}")
    folder = Path(folder) if folder is not None else cache_root() / "variants"
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "calibration"
    made = _Made.of(loaded)
    fp32 = made.file(folder, "fp32")
    if not made.reusable(fp32):
        with working_on(f"exporting {loaded.info.name} to ONNX (first use of these weights; kept in {folder})"):
            export_onnx(loaded, fp32)
    if precision == "fp32":
        return Variant("fp32", fp32)
    if precision == "fp16":
        path = made.file(folder, "fp16")
        if not made.reusable(path):
            make_fp16(fp32, path)
        return Variant("fp16", path)
    recipe = INT8_RECIPES[TARGET_RECIPES[target]]
    method = recipe.method or method or recipe.default_method
    calib = load_calibration_set(loaded.spec, calib_dir, calib_count)
    path = made.file(folder, "int8", calib, recipe.tag + method)
    if recipe.per_cpu:
        path = path.with_name(path.name.replace(".onnx", f"-cpu{cpu_tag()}.onnx"))
    if not made.reusable(path):
        recipe.quantize(fp32, path, calib, method, cache_dir=cache_dir)
        if val_pairs:
            try:
                search_int8_exclusions(loaded, fp32, path, calib, method, val_pairs[:SENSITIVITY_IMAGES], cache_dir, log, recipe)
            except LungrtError:
                path.unlink(missing_ok=True)  # never leave a variant that failed its gate for reuse
                raise
    if not target.startswith("tensorrt"):
        return Variant("int8", path, int8_notes(path))
    half = path.with_name(path.name.replace(".int8-", ".int8fp16-"))
    if not made.reusable(half):
        make_int8_fp16(path, half)
        if val_pairs:
            summary = _gate_summary(loaded, half, val_pairs[:SENSITIVITY_IMAGES])
            if not apply_gate(summary, GATES["int8"])["passed"]:
                half.unlink(missing_ok=True)
                raise LungrtError(f"the INT8+FP16 variant of {path.name} fails the INT8 gate "
                                  f"(agreement {summary['mask_agreement']:.4f})")
    return Variant("int8", half, {**int8_notes(half), "float": "fp16"})


def _gate_summary(loaded, path: Path, pairs, open_runner: Callable[[Path], Runner] = OnnxRuntimeRunner) -> dict:
    with open_runner(path) as cand:
        return compare(TorchRunner(loaded), cand, pairs, distances=False)["summary"]


def int8_notes(path: Path) -> dict:
    """What an INT8 variant was calibrated on and which blocks stay in floating point."""
    cal = json.loads(onnx_metadata(path).get("lungrt.calibration", "{}"))
    return {"calibration": cal.get("set"), "method": cal.get("method"), "recipe": cal.get("recipe", "portable"),
            "excluded_blocks": sorted({node_block(n) for n in cal.get("excluded_nodes", [])})}


def _score(summary: dict) -> float:
    return summary["mask_agreement"] - max(summary.get("dice_drop", 0.0), 0.0)


def search_int8_exclusions(loaded, fp32: Path, path: Path, calib, method, pairs, cache_dir,
                           log=logging.getLogger(__name__).info, recipe: Int8Recipe = INT8_RECIPES["portable"]) -> list[str]:
    """Leave the most sensitive blocks in floating point until INT8 passes its gate on `pairs`.

    A recipe's fallback quantization is tried whole first; the search then starts from whichever
    whole-graph form agreed better. Sensitivity of a block = what leaving only that block in float
    gains over the whole INT8 graph (agreement, less any task-Dice drop), each measured once: a
    better guide than the loss of quantizing that block alone (msag-unet without AMX: 3 blocks kept
    in float instead of 9 on the same derived graphs). Blocks are excluded most sensitive first; the
    search stops at the first exclusion set that passes. Every verdict gates the very file it leaves at `path`
    (the PyTorch reference runs once: parity caches it)."""
    import onnx

    gate = GATES["int8"]
    summary = _gate_summary(loaded, path, pairs, recipe.open)
    if apply_gate(summary, gate)["passed"]:
        return []
    log(f"INT8 fails its gate (agreement {summary['mask_agreement']:.4f})")
    quantize, whole = recipe.quantize, onnx.load(str(path)) if recipe.derive else None
    if recipe.fallback is not None:
        recipe.fallback(fp32, path, calib, method, exclude=[], cache_dir=cache_dir)
        second = _gate_summary(loaded, path, pairs, recipe.open)
        log(f"  {recipe.fallback.__name__}: agreement {second['mask_agreement']:.4f}")
        if apply_gate(second, gate)["passed"]:
            return []
        if second["mask_agreement"] > summary["mask_agreement"]:
            quantize, summary = recipe.fallback, second
            whole = onnx.load(str(path)) if recipe.derive else None
    fp32_model = onnx.load(str(fp32)) if recipe.derive else None

    def gated(exclude: list[str]) -> dict:
        if recipe.derive:  # every node of the excluded blocks (their Adds too), as an ignored scope would
            floated = {node_block(n) for n in exclude}
            names = [n.name for n in whole.graph.node if node_block(n.name) in floated]
            save_derived_int8(whole, fp32_model, exclude, path, names)
        else:
            quantize(fp32, path, calib, method, exclude=exclude, cache_dir=cache_dir)
        return _gate_summary(loaded, path, pairs, recipe.open)

    nodes = quantizable_nodes(fp32)
    blocks: dict[str, list[str]] = {}
    for n in nodes:
        blocks.setdefault(node_block(n), []).append(n)
    log(f"measuring the sensitivity of {len(blocks)} blocks ({quantize.__name__}"
        f"{', derived from the whole-graph file' if recipe.derive else ''})")
    gain = {b: _score(gated(members)) - _score(summary) for b, members in blocks.items()}
    excluded: list[str] = []
    for b in sorted(gain, key=gain.get, reverse=True):
        excluded.append(b)
        summary = gated([n for blk in excluded for n in blocks[blk]])
        log(f"  excluding {', '.join(excluded)}: agreement {summary['mask_agreement']:.4f}")
        if apply_gate(summary, gate)["passed"]:
            return excluded
    raise LungrtError(f"INT8 cannot pass its gate even with every block in floating point ({path})")
