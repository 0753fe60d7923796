"""Making (and reusing) the precision variants of a model as ONNX files (OpenVINO's INT8: an IR),
with the INT8 accuracy search: if INT8 fails its parity gate on validation images, what causes it
is left unquantized until it passes (OpenVINO: the operations NNCF's accuracy control ranks most
sensitive; the other engines: whole blocks, by sensitivity)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Callable

from lungrt.core.cache import cache_root
from lungrt.core.progress import working_on
from lungrt.core.hardware import cpu_tag
from lungrt.models.checkpoint import LoadedModel, weights_hash
from lungrt.core.errors import LungrtError
from lungrt.export.onnx import EXPORT_REVISION, export_onnx
from lungrt.evaluation.parity import check_export, GATES, GateScore, apply_gate, compare, gate_score
from lungrt.export.precision import (
    DEFAULT_CALIBRATION_IMAGES,
    PRECISIONS,
    CalibrationSet,
    float_layers,
    load_calibration_set,
    make_fp16,
    make_int8,
    make_int8_fp16,
    make_int8_openvino,
    make_int8_ort_cpu,
    nncf_openvino,
    node_block,
    quantizable_nodes,
    save_int8_ir,
)
from lungrt.backends.base import Runner
from lungrt.backends.integrity import IR_SUFFIX, ContentMismatch, VerifiedOnnx, load_verified, remove_artifact
from lungrt.backends.onnxruntime import OnnxRuntimeRunner
from lungrt.backends.pytorch import TorchRunner

SENSITIVITY_IMAGES = 32  # validation images used by the INT8 exclusion search
# the INT8 searches (NNCF's accuracy control, the block search) stop here: on 2 cores NNCF's ran 9+ minutes in silence
INT8_SEARCH_MINUTES = 10.0
# the accuracy control aims this far inside the INT8 gate on its images (at most half the room the
# FP32 graph leaves), so the file it makes passes the gate with a margin
CONTROL_MARGIN = 0.005


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
    # the library searches what to leave in float under lungrt's gate (NNCF's accuracy control,
    # `accuracy_controlled_int8`) instead of lungrt's block search
    controlled: bool = False
    suffix: str = ".onnx"  # the artifact: an ONNX file, or an OpenVINO IR (.xml + .bin)


INT8_RECIPES = {
    "portable": Int8Recipe("", make_int8, OnnxRuntimeRunner),  # TensorRT's form, checked on ONNX Runtime
    "onnxruntime": Int8Recipe("ortcpu-", make_int8_ort_cpu, OnnxRuntimeRunner, per_cpu=True, default_method="minmax"),
    "openvino": Int8Recipe(
        "", make_int8_openvino, _open_openvino, method="nncf", per_cpu=True, controlled=True, suffix=IR_SUFFIX
    ),
}
# make_variant's `target` (an engine, or a backend name) -> the INT8 recipe it gets
TARGET_RECIPES = {
    "portable": "portable",
    "cpu": "portable",
    "tensorrt": "portable",
    "tensorrt-rtx": "portable",
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
}


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

    def file(
        self, folder: Path, precision: str, calib: CalibrationSet | None = None, method: str = "", suffix: str = ".onnx"
    ) -> Path:
        if precision == "int8":
            return folder / f"{self.stem}.int8-{method}-{calib.digest}{suffix}"  # method: recipe tag + method
        return folder / f"{self.stem}.{precision}{suffix}"

    def reusable(self, path: Path) -> bool:
        return self.verified(path) is not None

    def verified(self, path: Path) -> VerifiedOnnx | None:
        """A cached variant's contents, checked, when it may be used: its graph hashes to the content
        hash it records and it was made from these very weights and model metadata (spec, QC
        thresholds). A file cut short (crash, full disk), corrupted or edited, or another model saved
        under the name is removed (None): it is made again."""
        if not path.exists():
            return None
        try:
            checked = load_verified(path)  # by content: a corrupted or edited cache file is made again
            meta = checked.meta
            ok = (
                meta.get("lungrt.weights_hash") == self.weights
                and json.loads(meta.get("lungrt.model", "{}")) == self.info
                and meta.get("lungrt.export.revision") == EXPORT_REVISION
            )  # made by an older exporter: remake
        except ContentMismatch as e:
            logging.getLogger(__name__).warning("%s; making it again", e)
            ok = False
        except Exception:
            ok = False
        if not ok:
            remove_artifact(path)
            return None
        return checked


def make_variant(
    loaded: LoadedModel,
    precision: str,
    folder: str | Path | None = None,
    calib_dir: str | Path | None = None,
    method: str | None = None,
    val_pairs=None,
    calib_count: int = DEFAULT_CALIBRATION_IMAGES,
    cache_dir: str | Path | None = None,
    log=logging.getLogger(__name__).info,
    target: str = "portable",
    search_minutes: float = INT8_SEARCH_MINUTES,
) -> Variant:
    """The ONNX file of one precision variant, made once and reused while the weights (and, for
    INT8, calibration set, method and recipe) are unchanged.

    `target` picks the INT8 recipe (TARGET_RECIPES): the portable Q/DQ graph; "onnxruntime" and
    "openvino" their CPU forms; "tensorrt" the portable graph with FP16 for everything that is not
    INT8 (`make_int8_fp16`). With `val_pairs`, INT8 is gated on them by the runner that will
    execute it, leaving the most sensitive blocks in float until it passes; that search says each step and
    stops after `search_minutes` (then no INT8 variant is kept)."""
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
            export_onnx(loaded, fp32, check_export(loaded))
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
    path = made.file(
        folder, "int8", calib, recipe.tag + method + (f"-cpu{cpu_tag()}" if recipe.per_cpu else ""), recipe.suffix
    )
    gate_on = val_pairs[:SENSITIVITY_IMAGES] if val_pairs else None
    # each file is checked by content once per request (its runner checks it again when it opens it)
    checked = _gated_cache(made, loaded, path, gate_on, recipe.open, log)
    if checked is None:
        try:
            if recipe.controlled and val_pairs:
                accuracy_controlled_int8(
                    loaded, fp32, path, calib, val_pairs[:SENSITIVITY_IMAGES], log, recipe, search_minutes
                )
            else:
                recipe.quantize(fp32, path, calib, method, cache_dir=cache_dir)
                if val_pairs:
                    search_int8_exclusions(
                        loaded,
                        fp32,
                        path,
                        calib,
                        method,
                        val_pairs[:SENSITIVITY_IMAGES],
                        cache_dir,
                        log,
                        recipe,
                        search_minutes,
                    )
        except LungrtError:
            remove_artifact(path)  # never leave a variant that failed its gate for reuse
            raise
        checked = load_verified(path)
        if gate_on:
            _remember_passed(path, checked.content_hash, gate_on)
    if not target.startswith("tensorrt"):
        return Variant("int8", path, int8_notes(checked.meta))
    half = path.with_name(path.name.replace(".int8-", ".int8fp16-"))
    checked_half = _gated_cache(made, loaded, half, gate_on, OnnxRuntimeRunner, log)
    if checked_half is None:
        make_int8_fp16(path, half)
        checked_half = load_verified(half)
        if gate_on:
            summary = _gate_summary(loaded, half, gate_on)
            if not apply_gate(summary, GATES["int8"])["passed"]:
                half.unlink(missing_ok=True)
                raise LungrtError(
                    f"the INT8+FP16 variant of {path.name} fails the INT8 gate "
                    f"(agreement {summary['mask_agreement']:.4f})"
                )
            _remember_passed(half, checked_half.content_hash, gate_on)
    return Variant("int8", half, {**int8_notes(checked_half.meta), "float": "fp16"})


def _gated_cache(made: _Made, loaded, path: Path, gate_on, open_runner, log) -> VerifiedOnnx | None:
    """The cached INT8 file's checked contents when it may serve this request, else None (removed):
    with a gate, only a file recorded as having passed this gate on these images, or one that passes
    it now (a cached INT8 made without a gate, or gated on other images or by another gate)."""
    checked = made.verified(path)
    if checked is None or not gate_on or _passed_before(path, checked.content_hash, gate_on):
        return checked
    summary = _gate_summary(loaded, path, gate_on, open_runner)
    if apply_gate(summary, GATES["int8"])["passed"]:
        _remember_passed(path, checked.content_hash, gate_on)
        return checked
    log(
        f"{path.name} was cached without passing this gate (agreement {summary['mask_agreement']:.4f}); making it again"
    )
    remove_artifact(path)
    return None


def _gate_record(content_hash: str, pairs) -> dict:
    """What a variant passed: its content, the gate and the images it was gated on."""
    names = hashlib.sha256("\n".join(str(p.image) for p in pairs).encode()).hexdigest()[:16]
    return {"content_hash": content_hash, "gate": list(astuple(GATES["int8"])), "images": names}


def _record_file(path: Path) -> Path:
    return path.with_name(path.name + ".gate.json")


def _passed_before(path: Path, content_hash: str, pairs) -> bool:
    """Did this very file (by its checked content hash) pass this gate on these images?"""
    try:
        return json.loads(_record_file(path).read_text()) == _gate_record(content_hash, pairs)
    except (OSError, ValueError):
        return False


def _remember_passed(path: Path, content_hash: str, pairs) -> None:
    from lungrt.data.io import atomic_write_bytes

    atomic_write_bytes(_record_file(path), json.dumps(_gate_record(content_hash, pairs)).encode(), durable=False)


def _gate_summary(loaded, path: Path, pairs, open_runner: Callable[[Path], Runner] = OnnxRuntimeRunner) -> dict:
    with open_runner(path) as cand:
        return compare(TorchRunner(loaded), cand, pairs, distances=False)["summary"]


def int8_notes(meta: dict) -> dict:
    """What an INT8 variant (its checked metadata) was calibrated on and which blocks (OpenVINO:
    which layers) were put back in floating point for its gate."""
    cal = json.loads(meta.get("lungrt.calibration", "{}"))
    notes = {
        "calibration": cal.get("set"),
        "method": cal.get("method"),
        "recipe": cal.get("recipe", "portable"),
        "excluded_blocks": sorted({node_block(n) for n in cal.get("excluded_nodes", [])}),
    }
    if "int8_layers" in cal:  # an IR's census: INT8 layers, and the float ones (reverted or never quantized)
        notes.update(
            excluded_layers=cal["excluded_nodes"], int8_layers=cal["int8_layers"], float_layers=cal["float_layers"]
        )
    return notes


class SearchBound:
    """The INT8 searches' clock: a line per step with the time spent and left; a LungrtError past the bound."""

    def __init__(self, what: str, minutes: float, log):
        self.what, self.limit, self.log, self.steps, self.t0 = what, minutes * 60.0, log, 0, time.monotonic()

    def step(self, detail: str = "") -> None:
        self.steps += 1
        spent = time.monotonic() - self.t0
        if spent > self.limit:
            raise LungrtError(
                f"{self.what} stopped at its bound of {self.limit / 60:g} min after {self.steps - 1} "
                "steps (--search-minutes); no INT8 variant kept"
            )
        self.log(
            f"  {self.what}: step {self.steps}{detail}, {spent:.0f} s spent, at most {self.limit - spent:.0f} s left"
        )


def accuracy_controlled_int8(
    loaded,
    fp32: Path,
    path: Path,
    calib,
    pairs,
    log=logging.getLogger(__name__).info,
    recipe: Int8Recipe = INT8_RECIPES["openvino"],
    search_minutes: float = INT8_SEARCH_MINUTES,
) -> list[str]:
    """OpenVINO's INT8 under lungrt's gate: the whole graph quantized by NNCF, and if that fails
    the gate on `pairs`, NNCF's `quantize_with_accuracy_control` scoring each candidate with the
    gate's own score (`GateScore`, on OpenVINO, as it will run) and reverting the quantized
    operations that cost it most, one at a time, until it is CONTROL_MARGIN inside the gate. The
    file left at `path` is then gated like every variant. Returns the layers put back in float."""
    gate = GATES["int8"]
    whole = recipe.quantize(fp32, path, calib, "nncf")
    summary = _gate_summary(loaded, path, pairs, recipe.open)
    if apply_gate(summary, gate)["passed"]:
        return []
    log(
        f"INT8 fails its gate (agreement {summary['mask_agreement']:.4f}); NNCF's accuracy control reverts the "
        "operations that cost the most agreement"
    )
    score = GateScore(TorchRunner(loaded), pairs)
    with recipe.open(fp32) as float_graph:  # the score the drop is measured from
        initial = score(float_graph.run)
    target = gate.min_agreement + min(CONTROL_MARGIN, max(initial - gate.min_agreement, 0.0) / 2)
    bound = SearchBound("NNCF accuracy control (one step: every gating image on one candidate)", search_minutes, log)

    def scored(compiled, indices) -> float:
        bound.step(f" ({len(pairs)} images)")
        return score(lambda x: next(iter(compiled(x).values())), indices)

    model = nncf_openvino(fp32, calib, validation=(scored, len(score), max(initial - target, 0.0)))
    reverted = sorted(set(float_layers(model)) - set(whole["float_layers"]))
    save_int8_ir(model, fp32, path, calib, reverted)
    summary = _gate_summary(loaded, path, pairs, recipe.open)
    log(f"  {len(reverted)} layer(s) back in float: agreement {summary['mask_agreement']:.4f}")
    if not apply_gate(summary, gate)["passed"]:
        raise LungrtError(
            f"INT8 fails its gate even after NNCF's accuracy control ({path}: agreement "
            f"{summary['mask_agreement']:.4f})"
        )
    return reverted


def search_int8_exclusions(
    loaded,
    fp32: Path,
    path: Path,
    calib,
    method,
    pairs,
    cache_dir,
    log=logging.getLogger(__name__).info,
    recipe: Int8Recipe = INT8_RECIPES["portable"],
    search_minutes: float = INT8_SEARCH_MINUTES,
) -> list[str]:
    """Leave the most sensitive blocks in floating point until INT8 passes its gate on `pairs`
    (the ONNX Q/DQ recipes; OpenVINO's uses NNCF's own search, `accuracy_controlled_int8`).

    Sensitivity of a block = what leaving only that block in float gains over the whole INT8 graph
    (agreement, less any task-Dice drop), each measured once: a better guide than the loss of
    quantizing that block alone (msag-unet without AMX: 3 blocks kept in float instead of 9).
    Blocks are excluded most sensitive first; the search stops at the first exclusion set that
    passes. Every verdict gates the very file it leaves at `path` (the PyTorch reference runs
    once: parity caches it)."""
    gate = GATES["int8"]
    summary = _gate_summary(loaded, path, pairs, recipe.open)
    if apply_gate(summary, gate)["passed"]:
        return []
    log(f"INT8 fails its gate (agreement {summary['mask_agreement']:.4f})")

    bound = SearchBound("INT8 block search", search_minutes, log)

    def gated(exclude: list[str]) -> dict:
        bound.step(f" ({len(exclude)} operations in float)")
        recipe.quantize(fp32, path, calib, method, exclude=exclude, cache_dir=cache_dir)
        return _gate_summary(loaded, path, pairs, recipe.open)

    blocks: dict[str, list[str]] = {}
    for n in quantizable_nodes(fp32):
        blocks.setdefault(node_block(n), []).append(n)
    log(f"measuring the sensitivity of {len(blocks)} blocks ({recipe.quantize.__name__})")
    gain = {b: gate_score(gated(members)) - gate_score(summary) for b, members in blocks.items()}
    excluded: list[str] = []
    for b in sorted(gain, key=gain.get, reverse=True):
        excluded.append(b)
        summary = gated([n for blk in excluded for n in blocks[blk]])
        log(f"  excluding {', '.join(excluded)}: agreement {summary['mask_agreement']:.4f}")
        if apply_gate(summary, gate)["passed"]:
            return excluded
    raise LungrtError(f"INT8 cannot pass its gate even with every block in floating point ({path})")
