"""`lungrt build`: the deployable artefact for a model, verified.

Backends: `tensorrt` (standard TensorRT, built on its GPU), `tensorrt-rtx` (TensorRT for RTX GPUs,
built ahead of time without one, default target SM86 = RTX 3090), `onnxruntime` and `openvino`
(the variant file made for that engine), `auto` (a TensorRT flavour that can build here, else ONNX
Runtime), `cpu` (with `--precision auto`: every CPU engine x precision, see `build_cpu_auto`).

Every build is checked: the compiled engine against PyTorch where it can run (a GPU is present);
where it cannot, the exact ONNX graph it compiled runs on ONNX Runtime instead, and the report says
so. `--precision auto` gates every candidate and keeps the fastest that passes, or among those within
timing noise of it the most faithful (timed where it can run; on TensorRT without a GPU, untimed, the
lowest precision that passes).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from lungrt.core.defaults import DEFAULT_MODEL
from lungrt.models.checkpoint import LoadedModel
from lungrt.data.datasets import discover_pairs, select_split, validation_pairs
from lungrt.backends.tensorrt import FLAVOURS, BatchProfile, PolygraphyBuilder, build_engine, choose_flavour
from lungrt.core.errors import BackendUnavailable, LungrtError
from lungrt.export.onnx import reference_inputs
from lungrt.evaluation.parity import GATES, apply_gate, compare, throughput, verify_candidate
from lungrt.data.phantoms import write_phantom_dataset
from lungrt.export.precision import PRECISIONS
from lungrt.backends.base import Runner
from lungrt.backends.pytorch import TorchRunner
from lungrt.build.resolve import open_runner, record_cpu_choice
from lungrt.build.variants import INT8_SEARCH_MINUTES, make_variant

log_ = logging.getLogger(__name__)
BACKENDS = ("auto", "tensorrt", "tensorrt-rtx", "onnxruntime", "openvino", "cpu")
# `build --backend cpu --precision auto`: engine x precision; FP16 is left out (no FP16 compute on
# these CPUs: ONNX Runtime and OpenVINO upcast it), bf16 is OpenVINO's mode on the FP32 graph.
CPU_CANDIDATES = (
    ("onnxruntime", "fp32"),
    ("onnxruntime", "int8"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
    ("openvino", "int8"),
)


@dataclass
class Built:
    backend: str
    precision: str
    path: Path  # .plan for TensorRT, .onnx for ONNX Runtime
    notes: dict
    onnx: Path | None = None  # the variant graph an engine was compiled from
    verification: dict = field(default_factory=dict)


def run_build(
    model: str | None,
    onnx: Path | None,
    precision: str,
    backend: str,
    target: str | None,
    calib: Path | None,
    method: str | None,
    data: Path | None,
    batch: str,
    workspace: float,
    out_dir: Path,
    rebuild: bool,
    arch: str | None = None,
    log=log_.info,
    search_minutes: float = INT8_SEARCH_MINUTES,
) -> dict:
    """`lungrt build`: a file (`onnx`) compiled for TensorRT, one precision, `--precision auto` on a
    backend, or every CPU engine (`backend="cpu"`); each verified. Returns what was built (or chosen).
    `search_minutes` bounds each INT8 search (NNCF's accuracy control, the block search)."""
    from lungrt.backends.tensorrt import parse_targets
    from lungrt.models.checkpoint import resolve_model

    be = choose_backend(backend, log=log)
    profile, targets = BatchProfile.parse(batch), parse_targets(target)
    if be == "cpu" and precision != "auto":
        raise LungrtError(
            "--backend cpu compares the CPU engines: use it with --precision auto (or pick --backend "
            "onnxruntime|openvino)"
        )
    if onnx is not None:
        b = build_from_onnx(onnx, be, out_dir, model, arch, data, profile, workspace, rebuild, targets, log=log)
        return {
            "backend": b.backend,
            "precision": b.precision,
            "path": str(b.path),
            "census": b.notes["engine"]["dtype_census"],
        }
    loaded = resolve_model(model or DEFAULT_MODEL, arch=arch)
    if precision == "auto" and be == "cpu":
        return build_cpu_auto(loaded, out_dir, calib, method, data, profile, log=log, search_minutes=search_minutes)
    if precision == "auto":
        return build_auto(
            loaded,
            be,
            out_dir,
            calib,
            method,
            data,
            profile,
            workspace,
            rebuild,
            targets,
            log=log,
            search_minutes=search_minutes,
        )
    b = build_and_verify(
        loaded,
        precision,
        be,
        out_dir,
        calib,
        method,
        data,
        profile,
        workspace,
        rebuild,
        targets,
        log=log,
        search_minutes=search_minutes,
    )
    return {
        "backend": b.backend,
        "precision": b.precision,
        "path": str(b.path),
        "census": b.notes.get("engine", {}).get("dtype_census"),
    }


def choose_backend(backend: str, log=log_.info) -> str:
    if backend not in BACKENDS:
        raise LungrtError(f"unknown backend {backend!r}; use {', '.join(BACKENDS)}")
    if backend in ("onnxruntime", "openvino", "cpu"):
        return backend
    try:
        return choose_flavour(backend).name
    except LungrtError as e:
        if backend != "auto":
            raise
        log(f"{str(e).split(';')[0]}; building the ONNX Runtime variant instead")
        return "onnxruntime"


def build_one(
    loaded: LoadedModel,
    precision: str,
    backend: str,
    out_dir: Path,
    calib: Path | None,
    method: str,
    val_pairs,
    batch: BatchProfile,
    workspace: float,
    rebuild: bool,
    targets=None,
    log=log_.info,
    cache_dir: Path | None = None,
    search_minutes: float = INT8_SEARCH_MINUTES,
) -> Built:
    on_trt = backend in FLAVOURS
    variant = make_variant(
        loaded,
        precision,
        folder=out_dir,
        calib_dir=calib,
        method=method,
        val_pairs=val_pairs,
        log=log,
        target="tensorrt" if on_trt else backend,
        search_minutes=search_minutes,
        **({"cache_dir": cache_dir} if cache_dir else {}),
    )
    if not on_trt:
        return Built(backend, precision, variant.path, variant.notes, variant.path)
    builder = PolygraphyBuilder(backend, targets)
    meta = build_engine(variant.path, out_dir, batch, workspace, builder=builder, rebuild=rebuild, log=log)
    return Built(backend, precision, out_dir / meta["plan"], {**variant.notes, "engine": meta}, variant.path)


def open_built(b: Built) -> Runner:
    return open_runner(b.path, backend=b.backend, precision=b.precision)


def open_for_verification(b: Built, log=log_.info) -> tuple[Runner, str]:
    """The compiled engine where it can run here; where its hardware is missing (a TensorRT plan
    without a GPU), the exact ONNX graph it compiled, on ONNX Runtime, and the report says so."""
    try:
        return open_built(b), "engine"
    except BackendUnavailable as e:
        if b.backend not in FLAVOURS:
            raise
        log(
            f"engine not run here ({str(e).split('(')[0].strip().rstrip(':')}); checking the ONNX graph it compiled "
            "on ONNX Runtime instead"
        )
        return open_runner(b.onnx, backend="onnxruntime", precision=b.precision), "compiled ONNX graph on onnxruntime"


def verify(b: Built, loaded: LoadedModel, pairs, log=log_.info, where: str = "") -> dict:
    """Parity of what was built against PyTorch FP32, on `pairs` (labelled; `where`: what they are)."""
    runner, what = open_for_verification(b, log)
    with runner:
        verdict = verify_candidate(TorchRunner(loaded), runner, pairs, b.precision)
    summary, gate, checked = verdict["parity"], verdict["gate"], verdict["runner"]
    out = {"checked": what, "images": summary["images"], **verdict}
    log(
        f"verified {b.path.name} ({what}, sha256 {checked['content_hash'][:16]}): mask agreement "
        f"{summary['mask_agreement']:.5f} on {where or str(summary['images']) + ' images'}, "
        f"{'passes' if gate['passed'] else 'FAILS'} the {b.precision} gate"
    )
    return out


PHANTOMS = "synthetic phantoms"


def gating_pairs(data: Path | None, spec_size: int, folder: Path):
    """(validation pairs of `data`, or 16 generated phantoms in `folder`; what they are, for every gate line:
    "48 X-rays from DIR (validation split)" or "16 synthetic phantoms (no --data)")."""
    val = validation_pairs(data)
    if val is not None:
        return val, f"{len(val)} X-rays from {data} (validation split)"
    phantoms = write_phantom_dataset(folder, 16, size=spec_size, seed=77)
    return discover_pairs(phantoms).pairs, f"16 {PHANTOMS} (no --data: drawings, not X-rays)"


def build_and_verify(
    loaded: LoadedModel,
    precision: str,
    backend: str,
    out_dir: Path,
    calib: Path | None,
    method: str,
    data: Path | None,
    batch: BatchProfile,
    workspace: float,
    rebuild: bool,
    targets=None,
    log=log_.info,
    search_minutes: float = INT8_SEARCH_MINUTES,
) -> Built:
    """`lungrt build --precision fp32|fp16|int8`: build, then check what was built."""
    with tempfile.TemporaryDirectory(prefix="lungrt-gate-") as tmp:
        t0 = time.perf_counter()
        pairs, where = gating_pairs(data, loaded.spec.size, Path(tmp))
        b = build_one(
            loaded,
            precision,
            backend,
            out_dir,
            calib,
            method,
            pairs if precision == "int8" else None,
            batch,
            workspace,
            rebuild,
            targets,
            log,
            search_minutes=search_minutes,
        )
        t1 = time.perf_counter()
        b.verification = {**verify(b, loaded, pairs, log, where), "images_from": where}
        _log_times(log, t1 - t0, time.perf_counter() - t1)
    return _passed_or_raise(b, loaded)


def _log_times(log, made: float, verified: float) -> None:
    """Where a build's wall time went: users saw 53 s for a 3.8 s TensorRT-RTX compile and nothing said why."""
    log(
        f"time: {made:.1f} s to make it (ONNX export, variant, calibration, compile), {verified:.1f} s to verify it "
        "against PyTorch (both sides on every gating image)"
    )


def build_from_onnx(
    onnx: Path,
    backend: str,
    out_dir: Path,
    model: str | None,
    arch: str | None,
    data: Path | None,
    batch: BatchProfile,
    workspace: float,
    rebuild: bool,
    targets=None,
    log=log_.info,
) -> Built:
    """`lungrt build --onnx F`: compile a variant lungrt wrote, then verify it like every build,
    against the PyTorch weights it was exported from (`model`, else the shipped model it names)."""
    from lungrt.backends.integrity import IR_SUFFIX, load_verified_onnx

    if onnx.suffix == IR_SUFFIX:
        raise LungrtError(
            f"{onnx}: an OpenVINO IR runs on OpenVINO as it is (`lungrt infer --onnx {onnx}`); TensorRT "
            "compiles the ONNX variants"
        )
    if backend not in FLAVOURS:
        raise LungrtError(
            f"{onnx}: already an ONNX Runtime / OpenVINO artefact; --onnx with build compiles it for "
            "a TensorRT backend (tensorrt, tensorrt-rtx)"
        )
    meta = load_verified_onnx(onnx).meta
    loaded = reference_weights(
        meta.get("lungrt.weights_hash"), json.loads(meta.get("lungrt.model", "{}")).get("name"), model, arch, onnx
    )
    precision = meta.get("lungrt.export.precision", "fp32")
    t0 = time.perf_counter()
    engine = build_engine(
        onnx, out_dir, batch, workspace, builder=PolygraphyBuilder(backend, targets), rebuild=rebuild, log=log
    )
    b = Built(backend, precision, Path(out_dir) / engine["plan"], {"engine": engine}, Path(onnx))
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lungrt-gate-") as tmp:
        pairs, where = gating_pairs(data, loaded.spec.size, Path(tmp))
        b.verification = {**verify(b, loaded, pairs, log, where), "images_from": where}
    _log_times(log, t1 - t0, time.perf_counter() - t1)
    return _passed_or_raise(b, loaded)


def reference_weights(
    weights: str | None, name: str | None, model: str | None, arch: str | None, source: Path
) -> LoadedModel:
    """The PyTorch weights an artifact was made from (their hash `weights`): `model` if given, else
    the shipped model `name`; refused when their hash is not `weights`."""
    from lungrt.models.checkpoint import resolve_model, weights_hash

    try:
        loaded = resolve_model(model or name, arch=arch) if model or name else None
    except LungrtError:
        loaded = None
    if loaded is None or weights_hash(loaded.model) != weights:
        raise LungrtError(
            f"{source}: made from weights {weights}; pass the checkpoint it was exported from with --model "
            "so the build can be verified against it"
        )
    return loaded


def _passed_or_raise(b: Built, loaded: LoadedModel) -> Built:
    _write_build_report(b, loaded)
    if not b.verification["gate"]["passed"]:
        raise LungrtError(
            f"{b.path}: built, but fails its parity gate (agreement "
            f"{b.verification['parity']['mask_agreement']:.5f}); see {b.path}.build.json"
        )
    return b


def parity_check(
    model: str | None,
    data: Path,
    backend: str = "auto",
    precision: str | None = None,
    onnx: Path | None = None,
    engine: Path | None = None,
    arch: str | None = None,
    split: str = "test",
    calib: Path | None = None,
    method: str | None = None,
    limit: int = 0,
    batch_size: int = 8,
    log=log_.info,
) -> dict:
    """`lungrt parity`: the candidate as named (a file on the backend asked, or the variant made
    for that backend) against PyTorch FP32, gated by the precision the candidate really runs."""
    pairs = select_split(data, split)
    pairs = pairs[:limit] if limit else pairs
    notes: dict = {}
    if onnx is not None or engine is not None:
        cand = open_runner(onnx=onnx, engine=engine, backend=backend, precision=precision)
        try:
            loaded = reference_weights(cand.weights_id, cand.info.name, model, arch, Path(onnx or engine))
        except LungrtError:
            cand.close()
            raise
    else:
        from lungrt.models.checkpoint import resolve_model

        loaded = resolve_model(model or DEFAULT_MODEL, arch=arch)
        cand, notes = _variant_candidate(loaded, backend, precision or "fp32", data, calib, method, log)
    with cand:
        result = compare(TorchRunner(loaded), cand, pairs, batch_size=batch_size)
    result["variant"], result["notes"] = cand.precision, notes
    result["gate"] = apply_gate(result["summary"], GATES[cand.precision])
    return result


def _variant_candidate(
    loaded: LoadedModel, backend: str, precision: str, data: Path, calib: Path | None, method: str, log
) -> tuple[Runner, dict]:
    if backend == "torch":
        return open_runner(loaded, backend="torch", precision=precision), {}
    if backend in FLAVOURS:
        raise LungrtError(f"backend {backend}: pass the plan to check (--engine PLAN; see `lungrt build`)")
    backend = "onnxruntime" if backend == "auto" else backend
    if precision == "bf16" and backend != "openvino":
        raise LungrtError("precision bf16 runs on --backend openvino (or torch)")
    val = select_split(data, "val") if precision == "int8" else None
    v = make_variant(
        loaded,
        "fp32" if precision == "bf16" else precision,
        calib_dir=calib or data,
        method=method,
        val_pairs=val,
        log=log,
        target=backend,
    )
    return open_runner(v.path, backend=backend, precision=precision), v.notes


def _write_build_report(b: Built, loaded: LoadedModel) -> None:
    report = {
        "model": loaded.info.name,
        "backend": b.backend,
        "precision": b.precision,
        "path": str(b.path),
        "onnx": str(b.onnx),
        "notes": b.notes,
        "verification": b.verification,
    }
    b.path.with_name(b.path.name + ".build.json").write_text(json.dumps(report, indent=2, default=str))


def build_auto(
    loaded: LoadedModel,
    backend: str,
    out_dir: Path,
    calib: Path | None,
    method: str,
    data: Path | None,
    batch: BatchProfile,
    workspace: float,
    rebuild: bool,
    targets=None,
    log=log_.info,
    search_minutes: float = INT8_SEARCH_MINUTES,
) -> dict:
    """Every candidate precision, gated and (where it can run) timed; the fastest passing wins (`fastest_faithful`)."""
    x = reference_inputs(loaded.spec, batch.opt)
    with tempfile.TemporaryDirectory(prefix="lungrt-gate-") as tmp:
        val, where = gating_pairs(data, loaded.spec.size, Path(tmp))
        opened = []
        for precision in PRECISIONS:
            log(f"candidate {precision}: building")
            b = build_one(
                loaded,
                precision,
                backend,
                out_dir,
                calib,
                method,
                val,
                batch,
                workspace,
                rebuild,
                targets,
                log,
                search_minutes=search_minutes,
            )
            runner, what = open_for_verification(b, log)
            opened.append(
                (
                    {"precision": precision, "path": str(b.path), "checked": what, "notes": b.notes},
                    runner,
                    what == "engine",
                )
            )
        _gate_all_then_time(loaded, opened, val, x, log, where)
        candidates = [row for row, _, _ in opened]
    passing = [c for c in candidates if c["gate"]["passed"]]
    if not passing:
        raise LungrtError("no precision variant passed its parity gate; see the report")
    if all(c["img_per_s"] is not None for c in passing):
        choice, rule = fastest_faithful(passing), FASTEST_RULE
    else:  # engines that cannot run here: the lowest precision that passes (INT8 > FP16 > FP32 on RTX GPUs)
        choice, rule = passing[-1], "lowest passing precision (not timed: no GPU here)"
    report = {
        "model": loaded.info.name,
        "backend": backend,
        "batch_for_timing": batch.opt,
        "validation_images": len(val),
        "validation": where,
        "candidates": candidates,
        "choice": choice["precision"],
        "rule": rule,
        "path": choice["path"],
    }
    return _write_auto_report(report, out_dir / f"{loaded.info.name}-auto-{backend}")


SAME_SPEED = (
    0.10  # timing noise here: one bf16 config spans 82-94 img/s within a bench run; closer speeds are not told apart
)
FASTEST_RULE = f"fastest passing; within {SAME_SPEED:.0%} of it, the most faithful"


def fastest_faithful(passing: list[dict]) -> dict:
    """The fastest gated candidate, unless another is within timing noise of it and agrees better
    with PyTorch FP32: then that one (bf16 over an INT8 4% faster is the same speed, closer masks)."""
    top = max(c["img_per_s"] for c in passing)
    tied = [c for c in passing if c["img_per_s"] >= (1 - SAME_SPEED) * top]
    return max(tied, key=lambda c: (c["parity"]["mask_agreement"], c["img_per_s"]))


def _candidate(row: dict) -> str:
    return f"{row['backend']} {row['precision']}" if "backend" in row else row["precision"]


def _gate(loaded: LoadedModel, runner: Runner, val, row: dict, log=log_.info, where: str = "") -> None:
    """One `--precision auto` candidate's parity against PyTorch FP32 on `val` and its gate, into `row`."""
    summary = compare(TorchRunner(loaded), runner, val)["summary"]
    gate = apply_gate(summary, GATES[row["precision"]])
    summary.pop("worst", None)
    log(
        f"candidate {_candidate(row)}: agreement {summary['mask_agreement']:.5f} on {where or 'the gating images'}, "
        f"{'passes' if gate['passed'] else 'FAILS'} its gate"
    )
    row.update(runner=runner.identity(), gate=gate, parity=summary, img_per_s=None)


TIMING_ROUNDS = 3  # candidates timed in turn, this many rounds of 1 s each: this VM drifts by 1.5x within a minute


def _time_in_turn(timed: list[tuple[dict, Runner]], x, log=log_.info) -> None:
    """Each passing candidate's img/s on batch `x` (median of TIMING_ROUNDS rounds, the candidates
    timed in turn, order reversed each round), so a slow minute of a shared machine falls on all of
    them alike; one after the other, the same OpenVINO INT8 file read 95 and 160 img/s."""
    speeds: dict[int, list[float]] = {i: [] for i in range(len(timed))}
    order = list(range(len(timed)))
    for r in range(TIMING_ROUNDS):
        for i in order if r % 2 == 0 else order[::-1]:
            speeds[i].append(throughput(timed[i][1], x, seconds=1.0))
    for i, (row, _) in enumerate(timed):
        row["img_per_s"] = float(sorted(speeds[i])[len(speeds[i]) // 2])
        log(
            (
                f"candidate {_candidate(row)}: {row['img_per_s']:.1f} img/s at "
                f"batch {len(x)} (median of {TIMING_ROUNDS} rounds)"
            )
        )


def _gate_all_then_time(
    loaded: LoadedModel, opened: list[tuple[dict, Runner, bool]], val, x, log=log_.info, where: str = ""
) -> None:
    """Gate every opened candidate (row, runner, whether it can be timed here), then time the ones
    that pass and can be timed, in turn, each result into its row; closes every runner."""
    try:
        for row, runner, _ in opened:
            _gate(loaded, runner, val, row, log, where)
        timed = [(row, runner) for row, runner, timeable in opened if timeable and row["gate"]["passed"]]
        if timed:
            _time_in_turn(timed, x, log)
    finally:
        for _, runner, _ in opened:
            runner.close()


def _write_auto_report(report: dict, stem: Path) -> dict:
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    stem.with_suffix(".md").write_text(auto_report_markdown(report))
    report["report"] = str(stem.with_suffix(".md"))
    return report


def build_cpu_auto(
    loaded: LoadedModel,
    out_dir: Path,
    calib: Path | None,
    method: str,
    data: Path | None,
    batch: BatchProfile,
    log=log_.info,
    search_minutes: float = INT8_SEARCH_MINUTES,
) -> dict:
    """`lungrt build --backend cpu --precision auto`: every CPU engine x precision here, each gated
    against PyTorch FP32 and timed at the profile's batch; the fastest that passes (`fastest_faithful`) is recorded for
    these weights on this CPU (infer, demo and the API use it from then on)."""
    x = reference_inputs(loaded.spec, batch.opt)
    candidates, opened = [], []  # every candidate's row; the opened ones are gated and timed together below
    with tempfile.TemporaryDirectory(prefix="lungrt-gate-") as tmp:
        val, where = gating_pairs(data, loaded.spec.size, Path(tmp))
        for backend, precision in CPU_CANDIDATES:
            row = {"backend": backend, "precision": precision}
            try:
                variant = make_variant(
                    loaded,
                    "fp32" if precision == "bf16" else precision,
                    folder=out_dir,
                    calib_dir=calib,
                    method=method,
                    val_pairs=val if precision == "int8" else None,
                    log=log,
                    target=backend,
                    search_minutes=search_minutes,
                )
                runner = open_runner(variant.path, backend=backend, precision=precision)
            except BackendUnavailable as e:
                log(f"candidate {backend} {precision}: skipped ({e})")
                candidates.append({**row, "skipped": str(e)})
                continue
            except LungrtError as e:  # e.g. INT8 that no exclusion set gets through its gate
                log(f"candidate {backend} {precision}: FAILS ({e})")
                candidates.append({**row, "failed": str(e)})
                continue
            row.update(path=str(variant.path), checked="as deployed", notes=variant.notes)
            candidates.append(row)
            opened.append((row, runner, True))
        _gate_all_then_time(loaded, opened, val, x, log, where)
    passing = [c for c in candidates if c.get("gate", {}).get("passed")]
    if not passing:
        raise LungrtError("no CPU configuration passed its parity gate; see the log above")
    choice = fastest_faithful(passing)
    report = {
        "model": loaded.info.name,
        "backend": "cpu",
        "batch_for_timing": batch.opt,
        "validation_images": len(val),
        "validation": where,
        "candidates": candidates,
        "choice": f"{choice['backend']} {choice['precision']}",
        "rule": f"{FASTEST_RULE}, timed here",
        "path": choice["path"],
    }
    _write_auto_report(report, out_dir / f"{loaded.info.name}-auto-cpu")
    if data is None:  # a choice gated on drawings must never decide what runs on real films
        report["record"] = None
        report["not_recorded"] = (
            "not recorded for infer: gated on synthetic phantoms only; rerun with --data DIR "
            "(labelled X-rays) to record a choice"
        )
        log(report["not_recorded"])
        return report
    report["record"] = str(
        record_cpu_choice(
            loaded,
            {
                **{k: choice[k] for k in ("backend", "precision", "path", "img_per_s")},
                "content_hash": choice["runner"]["content_hash"],
                "mask_agreement": choice["parity"]["mask_agreement"],
                "gate_images": len(val),
                "gate_data": where,
            },
        )
    )
    return report


def census_text(census: dict | None) -> str:
    if not census:
        return ""
    nodes = ", ".join(f"{n} {k}" for k, n in census["compute_nodes"].items())
    kept = ", ".join(f"{k} {n}" for k, n in census["float32_ops"].items())
    return f"{nodes}" + (f" (float32: {kept})" if kept else "")


def auto_report_markdown(r: dict) -> str:
    engines = any(c.get("notes", {}).get("engine") for c in r["candidates"])  # TensorRT: show what it compiled
    lines = [
        f"### `--precision auto` for {r['model']} on {r['backend']}",
        f"Gated on {r['validation_images']} images ({r['validation']}); timed at batch {r['batch_for_timing']}.",
        "",
        "| candidate | checked | mask agreement | task Dice drop | gate | img/s |"
        + (" compute dtypes |" if engines else ""),
        "|---|---|---|---|---|---|" + ("---|" if engines else ""),
    ]
    for c in r["candidates"]:
        name = f"{c['backend']} {c['precision']}" if "backend" in c else c["precision"]
        if "parity" not in c:
            lines.append(
                (
                    f"| {name} | {'skipped' if 'skipped' in c else 'FAILED'}: {c.get('skipped') or c.get('failed')} "
                    f"| | | | |"
                )
                + (" |" if engines else "")
            )
            continue
        drop = c["parity"].get("dice_drop")
        speed = "n/a" if c["img_per_s"] is None else f"{c['img_per_s']:.1f}"
        census = census_text(c["notes"].get("engine", {}).get("dtype_census"))
        lines.append(
            f"| {name} | {c['checked']} | {c['parity']['mask_agreement']:.5f} | "
            f"{'' if drop is None else f'{drop:+.5f}'} | {'pass' if c['gate']['passed'] else 'FAIL'} | {speed} |"
            + (f" {census} |" if engines else "")
        )
    lines += ["", f"Chosen: **{r['choice']}** ({r['rule']}; `{r['path']}`)", ""]
    return "\n".join(lines)
