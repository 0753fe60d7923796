"""The `lungrt` command line (Typer + Rich)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lungrt._version import __version__
from lungrt.core.errors import LungrtError
from lungrt.core.defaults import DEFAULT_MODEL

app = typer.Typer(
    rich_markup_mode=None,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Lung-segmentation U-Nets for chest X-rays: train, export, verify, deploy fast.",
)
data_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True, help="Inspect datasets.")
app.add_typer(data_app, name="data")
out = Console(soft_wrap=True)  # piped output keeps whole lines (paths, summaries); tables still fit the terminal


def fail(message: str, code: int = 2) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run_guarded(fn):
    """Run a command body; typed lungrt errors become one line on stderr."""
    try:
        return fn()
    except LungrtError as e:
        fail(str(e))


def check_json_path(path: Optional[Path]) -> None:
    if path is not None and (path.is_dir() or str(path) in ("", ".")):
        fail(f"--json {path}: is a folder; give a file name such as {Path(path) / 'summary.json'}")


def write_json(path: Optional[Path], payload: dict) -> None:
    if path:
        check_json_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, default=str))
        out.print(f"wrote {path}")


@app.callback(invoke_without_command=True)
def main(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        help="Show lungrt's debug log and the INFO lines of NNCF, Polygraphy and the other libraries.",
    ),
):
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s [%(name)s] %(message)s", stream=sys.stderr)
    logging.getLogger("lungrt").setLevel(logging.DEBUG if verbose else logging.NOTSET)
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    if version:
        out.print(f"lungrt {__version__}")
        raise typer.Exit(0)


@app.command()
def doctor(
    engine: Optional[Path] = typer.Option(
        None, help="Also say whether this TensorRT plan can run here, and if not, why."
    ),
):
    """Versions, GPUs and which backends are usable here (and why not)."""
    from lungrt.doctor import collect, engine_checks

    report = collect()
    table = Table(title=f"lungrt {__version__} doctor")
    table.add_column("item")
    table.add_column("status")
    for k, v in report["versions"].items():
        table.add_row(k, escape(v))
    table.add_row("GPUs", escape(", ".join(report["gpus"])) or "none")
    for name, (ok, why) in report["backends"].items():
        table.add_row(f"backend {name}", ("[green]usable[/] " if ok else "[yellow]unavailable[/] ") + escape(why))
    out.print(table)
    if engine is not None:
        checks = engine_checks(engine)
        for name, ok, detail in checks:
            out.print(f"{engine.name}: {name}: {'ok' if ok else 'NO'}: {detail}", highlight=False, soft_wrap=True)
        runs = all(ok for _, ok, _ in checks)
        out.print(f"{engine}: {'can run here' if runs else 'cannot run here'}", highlight=False, soft_wrap=True)
        raise typer.Exit(0 if runs else 1)


@data_app.command("check")
def data_check(
    folder: Path = typer.Argument(..., help="Dataset folder (images/ + masks/, or NAME_mask files)."),
    seed: int = typer.Option(0, help="Split seed."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
):
    """Pairs found, unmatched and unreadable files, mask statistics and the 4:3:3 split."""
    from lungrt.data.datasets import check_dataset

    report = run_guarded(lambda: check_dataset(folder, seed))
    out.print(
        f"[bold]{folder}[/]: {report['pairs']} pairs, {report['readable_pairs']} readable, "
        f"{len(report['unmatched_images'])} unmatched images, {len(report['unmatched_masks'])} unmatched masks, "
        f"{len(report['unreadable'])} unreadable"
    )
    for item in report["unreadable"]:
        out.print(f"  unreadable {item['file']}: {item['reason']}", highlight=False)
    for p in report["unmatched_images"] + report["unmatched_masks"]:
        out.print(f"  unmatched {p}", highlight=False)
    lf = report["lung_fraction"]
    if lf["mean"] is not None:
        out.print(
            f"masks: {report['mask_values']}; lung fraction mean {lf['mean']:.3f} "
            f"(min {lf['min']:.3f}, max {lf['max']:.3f}), {lf['empty_masks']} empty"
        )
    table = Table(title=f"split (seed {seed}, 4:3:3)")
    table.add_column("split")
    table.add_column("images", justify="right")
    table.add_column("by source")
    for name, s in report["splits"].items():
        table.add_row(name, str(s["total"]), ", ".join(f"{k} {v}" for k, v in s["by_source"].items()))
    out.print(table)
    write_json(json_path, report)


@app.command()
def models(
    size: int = typer.Option(256, help="Input size for the GFLOPs count."),
    width: int = typer.Option(16, help="Base width."),
):
    """Each registered model's parameter count and GFLOPs per image."""
    from lungrt.models import REGISTRY, build_model, count_parameters, gflops_per_image

    table = Table(title=f"models at {size}x{size}, width {width}")
    for col in ("model", "parameters", "GFLOPs / image"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for name in REGISTRY:
        m = build_model(name, width)
        table.add_row(name, f"{count_parameters(m):,}", f"{gflops_per_image(m, size):.2f}")
    out.print(table)


@app.command()
def train(
    model: str = typer.Option(DEFAULT_MODEL, help="unet | gsconv-unet | msag-unet"),
    data: List[Path] = typer.Option(
        ..., help="Dataset folder; repeat to train on several (each declares its mask convention)."
    ),
    out_dir: Path = typer.Option(..., "--out", help="Run folder for checkpoint, metrics.json, loss curves."),
    convention: str = typer.Option(
        "",
        help="Mask convention to learn: lung-field | whole-lung (default: the first --data's). "
        "Lung-field sets can teach a whole-lung model where both agree.",
    ),
    epochs: int = typer.Option(50, help="Epochs (papers: 50)."),
    lr: float = typer.Option(1e-4, help="Peak AdamW learning rate (papers: 1e-4), cosine to 0.01x."),
    batch_size: int = typer.Option(8),
    size: int = typer.Option(256, help="Square input size (multiple of 16)."),
    width: int = typer.Option(16, help="Base channel width."),
    equalization: str = typer.Option("histogram", help="none | histogram | clahe"),
    seed: int = typer.Option(0),
    limit: int = typer.Option(0, help="Use only N training images (smoke runs)."),
    resume: bool = typer.Option(False, help="Continue from RUN_DIR/resume.pt."),
    device: str = typer.Option("auto", help="auto | cpu | cuda (AMP on CUDA, bf16 autocast on CPUs with native bf16)."),
    recipe: str = typer.Option(
        "basic", help="basic | robust (synthetic abnormalities, detector looks, wider geometry)."
    ),
    init: str = typer.Option("", help="Fine-tune from this checkpoint or shipped model name (same model and width)."),
    fit_on: str = typer.Option(
        "train",
        help="train (keep the best epoch by validation Dice) | train+val (keep the last epoch; test stays unseen).",
    ),
):
    """Train a model on image/mask pairs (4:3:3 split, best checkpoint by validation Dice)."""
    from lungrt.training.train import TrainConfig
    from lungrt.training.train import train as run_training

    cfg = TrainConfig(
        model=model,
        width=width,
        size=size,
        equalization=equalization,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        limit=limit,
        device=device,
        recipe=recipe,
        init=init,
        fit_on=fit_on,
        convention=convention,
    )
    result = run_guarded(lambda: run_training(cfg, list(data), out_dir, resume=resume, log=out.print))
    which = "last epoch's validation Dice (seen in training)" if fit_on == "train+val" else "best validation Dice"
    out.print(f"{which} {result['best_val_dice']:.4f}; checkpoint {result['checkpoint']}")


PAPERS_NOTE = "papers: Dice ~0.92 reported for their U-Net variants (exact per-metric figures not reproduced here)"


def _with_shape_fits(worst: list[tuple], runner) -> list[tuple]:
    """(name, image, gold, pred, fit) rows: each worst image's plausible shape fit at its size, when
    the model carries a shape model (else no fit outline)."""
    from lungrt.inference.qc import QCThresholds
    from lungrt.inference.shape import plausible_fit

    shape = QCThresholds.from_dict(runner.info.qc).shape
    return [
        (
            f"{name} (Dice {dice:.3f})",
            image,
            gold,
            pred,
            plausible_fit(prob, shape, pred.shape) if shape is not None else None,
        )
        for dice, name, image, gold, pred, prob in worst
    ]


def _stem(label: str) -> str:
    """A model's label as a file-name stem: a file's stem, else the name (shipped or run folder)."""
    return Path(label).stem if label.endswith((".onnx", ".xml", ".safetensors")) else Path(label).name


@app.command("eval")
def evaluate_cmd(
    model: List[str] = typer.Option(["unet"], help="Checkpoint, run folder or shipped name; repeat to compare."),
    onnx: Optional[Path] = typer.Option(
        None, help="Evaluate an exported ONNX variant instead (ONNX Runtime), or an OpenVINO INT8 IR (.xml, OpenVINO)."
    ),
    arch: Optional[str] = typer.Option(None, help="Architecture for bare .pt/.pth/.safetensors weights."),
    data: Path = typer.Option(..., help="Dataset folder."),
    split: str = typer.Option("test", help="train | val | test | all"),
    seed: int = typer.Option(0, help="Split seed."),
    batch_size: int = typer.Option(8),
    out_dir: Optional[Path] = typer.Option(
        None, "--out", help="Folder for per-image CSVs and the prediction grid PNGs."
    ),
    postprocess: bool = typer.Option(
        False, "--postprocess", help="Score after infer's clean-up (two largest components, holes filled)."
    ),
    robustness: bool = typer.Option(
        False,
        "--robustness",
        help=(
            "Instead: Dice with synthetic consolidation/haze/effusion painted "
            "inside the gold lung field, and consolidation spilling past its "
            "edge, per severity."
        ),
    ),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write means (and per-image rows) as JSON."),
    convention: Optional[str] = typer.Option(
        None,
        "--convention",
        help=(
            "lung-field | whole-lung: shipped names load their weights for "
            "it (default: lung-field); a file of the other is refused."
        ),
    ),
):
    """All metrics per image at native resolution (Dice, recall: the share of the true lung inside the mask,
    HD95, ...); a Table-1-style comparison for several models. Warns when the data's mask convention is not the
    model's."""
    if robustness:
        return _robustness_cmd(model, onnx, arch, data, split, seed, out_dir, json_path)
    from lungrt.data.datasets import select_split
    from lungrt.evaluation.evaluate import behind_heart_line, convention_warning, evaluate, write_per_image_csv
    from lungrt.core.plots import prediction_grid
    from lungrt.backends.select import open_runner

    def body():
        pairs = select_split(data, split, seed)
        refs = [None] if onnx else model
        results = []
        for ref in refs:
            with open_runner(
                ref, onnx=onnx, arch=arch, backend="auto" if onnx else "torch", convention=convention
            ) as runner:
                if warning := convention_warning(runner, data):
                    Console(stderr=True).print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False)
                res = evaluate(runner, pairs, batch_size=batch_size, keep=4, postprocess=postprocess)
                res["convention"] = runner.spec.convention
            label = Path(onnx).name if onnx else ref
            if out_dir:
                stem = _stem(label)
                write_per_image_csv(res["per_image"], out_dir / f"{stem}_per_image.csv")
                prediction_grid(res.pop("examples"), out_dir / f"{stem}_examples.png", title=f"{label} on {split}")
                prediction_grid(
                    _with_shape_fits(res.pop("worst"), runner),
                    out_dir / f"{stem}_worst.png",
                    title=f"{label} on {split}: lowest Dice (yellow: plausible shape fit)",
                )
            res.pop("examples", None)
            res.pop("worst", None)
            results.append((label, res))
        return results

    results = run_guarded(body)
    table = Table(title=f"{data} / {split} split (per-image mean at native resolution)")
    cols = ("Accuracy", "IoU", "mIoU", "Dice", "F1", "Precision", "Recall", "HD95 px")
    table.add_column("model")
    for c in cols:
        table.add_column(c, justify="right")
    for label, res in results:
        m = res["mean"]
        table.add_row(
            label,
            *[f"{m[k]:.4f}" for k in ("accuracy", "iou", "miou", "dice", "f1", "precision", "recall")],
            f"{m['hd95']:.2f}",
        )
    out.print(table)
    out.print(f"[dim]{PAPERS_NOTE}; {results[0][1]['mean']['images']} images[/]")
    for label, res in results:
        out.print(f"[dim]{label}: {behind_heart_line(res['per_image'])}[/]")
    write_json(
        json_path, {"data": str(data), "split": split, "seed": seed, "results": {label: res for label, res in results}}
    )


@app.command()
def export(
    model: str = typer.Option(DEFAULT_MODEL, help="Checkpoint, run folder or shipped name."),
    arch: Optional[str] = typer.Option(None, help="Architecture for bare .pt/.pth/.safetensors weights."),
    out_path: Path = typer.Option(..., "--out", help="Output .onnx file."),
    precision: str = typer.Option("fp32", help="fp32 | fp16 | int8"),
    calib: Optional[Path] = typer.Option(
        None, help="INT8 calibration folder (a dataset: its train split; else all images). Default: synthetic phantoms."
    ),
    method: Optional[str] = typer.Option(
        None,
        help=(
            "INT8 calibration: entropy | minmax | percentile (default: each "
            "engine's own: entropy for TensorRT, minmax for ONNX Runtime's "
            "CPU INT8; OpenVINO's is NNCF's)."
        ),
    ),
    val_data: Optional[Path] = typer.Option(
        None, help="Labelled dataset whose validation split gates INT8 (sensitive blocks are then left unquantized)."
    ),
):
    """Export to ONNX (opset 17, dynamic batch, metadata, simplified, checked against PyTorch),
    optionally as the FP16 or INT8 (explicit Q/DQ) variant."""
    import shutil

    from lungrt.models.checkpoint import resolve_model
    from lungrt.data.datasets import select_split
    from lungrt.export.variants import make_variant

    def body():
        loaded = resolve_model(model, arch=arch)
        val = select_split(val_data, "val") if val_data else None
        v = make_variant(loaded, precision, calib_dir=calib, method=method, val_pairs=val, log=out.print)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(v.path, out_path)
        return v

    v = run_guarded(body)
    out.print(f"wrote {out_path} ({v.precision}){'; ' + json.dumps(v.notes) if v.notes else ''}")


@app.command()
def parity(
    model: Optional[str] = typer.Option(
        None,
        help=(
            "Reference: checkpoint, run folder or shipped name (PyTorch FP32). "
            "Default: the weights an --onnx/--engine file was made from, else "
            "msag-unet."
        ),
    ),
    arch: Optional[str] = typer.Option(None, help="Architecture for bare weights."),
    variant: Optional[str] = typer.Option(
        None, help="fp32 | fp16 | int8 | bf16 (openvino, torch). Default: fp32, or the --onnx/--engine file's own."
    ),
    backend: str = typer.Option(
        "auto",
        help=(
            "Candidate backend: auto (onnxruntime; a plan's own flavour) | "
            "onnxruntime | openvino | torch | tensorrt | tensorrt-rtx"
        ),
    ),
    onnx: Optional[Path] = typer.Option(
        None, help="Candidate ONNX file or OpenVINO IR (.xml) (default: make the variant in $LUNGRT_CACHE)."
    ),
    engine: Optional[Path] = typer.Option(None, help="Candidate TensorRT plan."),
    data: Path = typer.Option(..., help="Dataset folder (labelled: task Dice is gated too)."),
    split: str = typer.Option("test"),
    calib: Optional[Path] = typer.Option(None, help="INT8 calibration folder (default: --data, its train split)."),
    method: Optional[str] = typer.Option(None, help="INT8 calibration (default: the engine's own, as in build)."),
    limit: int = typer.Option(0, help="Use only the first N images of the split."),
    batch_size: int = typer.Option(8),
    json_path: Optional[Path] = typer.Option(None, "--json"),
):
    """Compare a precision variant with the PyTorch FP32 reference; exit 1 when its gate fails."""
    from lungrt.build import parity_check

    def body():
        return parity_check(
            model,
            data,
            backend=backend,
            precision=variant,
            onnx=onnx,
            engine=engine,
            arch=arch,
            split=split,
            calib=calib,
            method=method,
            limit=limit,
            batch_size=batch_size,
            log=out.print,
        )

    result = run_guarded(body)
    s, g = result["summary"], result["gate"]
    table = Table(
        title=(
            f"parity {result['candidate']} vs {result['reference']} on {s['images']} images ({result['variant']} gate)"
        )
    )
    for col in ("metric", "value", "gate"):
        table.add_column(col)
    for k in (
        "max_abs_prob_diff",
        "mean_abs_prob_diff",
        "mask_agreement",
        "min_mask_agreement",
        "boundary_hd95_px",
        "dice_reference",
        "dice_candidate",
        "dice_drop",
    ):
        if k in s:
            chk = g["checks"].get(k)
            table.add_row(
                k,
                f"{s[k]:.6f}",
                "" if chk is None else (("[green]pass[/] " if chk["passed"] else "[red]FAIL[/] ") + chk["required"]),
            )
    out.print(table)
    out.print("worst images: " + ", ".join(f"{r['name']} ({r['agreement']:.4f})" for r in s["worst"]), highlight=False)
    if result["notes"]:
        out.print(f"variant notes: {json.dumps(result['notes'])}", highlight=False)
    ident = result["candidate_identity"]
    out.print(
        (
            f"verified {ident['file'] or 'in-memory weights'} (content sha256 "
            f"{ident['content_hash'] or ident['weights_hash']})"
        ),
        highlight=False,
        soft_wrap=True,
    )
    write_json(json_path, result)
    out.print("[bold green]PASS[/]" if g["passed"] else "[bold red]FAIL[/]: gate not met")
    raise typer.Exit(0 if g["passed"] else 1)


@app.command()
def infer(
    inputs: List[str] = typer.Argument(..., help="Files, folders (recursive) and globs of PNG/JPEG/BMP/TIFF/DICOM."),
    out_dir: str = typer.Option(..., "--out", help="Output folder (mirrors the input tree)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Checkpoint, run folder or shipped name."),
    arch: Optional[str] = typer.Option(None, help="Architecture for bare weights."),
    onnx: Optional[Path] = typer.Option(
        None,
        help=(
            "Run this ONNX file (ONNX Runtime; --backend openvino for OpenVINO), or an OpenVINO IR (.xml) on OpenVINO."
        ),
    ),
    engine: Optional[Path] = typer.Option(None, help="Run this TensorRT plan."),
    backend: str = typer.Option("auto", help="auto | torch | onnxruntime | openvino | tensorrt"),
    precision: Optional[str] = typer.Option(
        None,
        help=(
            "fp32 | fp16 | int8 (variants) | bf16 (openvino). Default: the "
            "file's own; for a model, the recorded CPU choice, else fp32."
        ),
    ),
    batch_size: int = typer.Option(
        8, min=1, max=4096, help="Images per model call (clamped to the number of inputs and the engine's profile)."
    ),
    workers: int = typer.Option(2, min=1, help="Decode/preprocess and writer threads (or processes, --pool process)."),
    pool: str = typer.Option(
        "thread",
        "--pool",
        help="Helpers for decoding and writing: thread | process (past the GIL: many-core hosts feeding a GPU).",
    ),
    overlay: bool = typer.Option(False, "--overlay", help="Also write an overlay PNG per image."),
    probabilities: bool = typer.Option(False, "--probabilities", help="Also write the probability map (8-bit PNG)."),
    postprocess: bool = typer.Option(
        True, "--postprocess/--no-postprocess", help="Keep the two largest components and fill holes."
    ),
    complete_shape: bool = typer.Option(
        False,
        "--complete-shape",
        help=(
            "Where QC finds an implausible lung shape, add the lung the model's "
            "shape fit says is missing (off by default: see the README's gate)."
        ),
    ),
    resume: bool = typer.Option(False, "--resume", help="Skip inputs whose outputs are complete."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first unreadable input."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the run summary as JSON."),
    report: bool = typer.Option(False, "--report", help="Also write OUT/report.html (QC-flagged images first)."),
    screen: str = typer.Option(
        "flag",
        "--screen",
        help=(
            "DICOM whose header says not a frontal chest film (modality, body "
            "part, lateral view): flag (QC reasons, no areas) | skip (no mask)."
        ),
    ),
    mask_bits: int = typer.Option(
        1, "--mask-bits", help="NAME.mask.png as a 1-bit PNG (default; 0/255 when read by OpenCV) or 8 (8-bit, 0/255)."
    ),
    dicom_seg: bool = typer.Option(
        False, "--dicom-seg", help="Also a DICOM Segmentation (NAME.seg.dcm) per DICOM input."
    ),
    store: bool = typer.Option(
        False,
        "--store",
        help=(
            "DICOMweb input: send this run's DICOM SEGs of its instances back "
            "to the PACS each came from (STOW-RS); implies --dicom-seg. Never "
            "a local input's SEG; QC-flagged films' SEGs stay local."
        ),
    ),
    store_flagged: bool = typer.Option(
        False,
        "--store-flagged",
        help=(
            "With --store: also send the SEGs of films QC flagged (their SEG's "
            "content description names the QC reasons)."
        ),
    ),
    convention: Optional[str] = typer.Option(
        None,
        "--convention",
        help=(
            "Mask convention: lung-field (default; heart excluded) | whole-lung "
            "(behind the heart included). Picks the shipped weights; a file "
            "of the other convention is refused."
        ),
    ),
    ray: Optional[str] = typer.Option(
        None, "--ray", help="Run on Ray: 'local' (start one here), 'auto', or a cluster address."
    ),
    actors: int = typer.Option(1, min=1, help="--ray: inference actors (one runner each)."),
    gpus_per_actor: float = typer.Option(0.0, min=0.0, help="--ray: GPUs reserved per actor."),
):
    """Lung masks and measurements for folders of X-rays. Exit 0: all ok; 3: some inputs failed
    (see results.csv); 2: bad arguments or model."""
    from lungrt.inference.infer import (
        EXIT_OK,
        EXIT_SOME_FAILED,
        HELPER_POOLS,
        InferOptions,
        run_identity,
        run_infer,
    )
    from lungrt.backends.select import open_runner

    if screen not in ("flag", "skip"):
        fail(f"--screen {screen!r}: choose flag or skip")
    from lungrt.inference.dicomweb import is_dicomweb_url

    pacs = [i for i in inputs if is_dicomweb_url(i)]
    if store and not pacs:
        fail("--store sends DICOM SEGs back to the PACS a DICOMweb input came from; give one (http://…/studies/UID)")
    if mask_bits not in (1, 8):
        fail(f"--mask-bits {mask_bits}: choose 1 or 8")
    if pool not in HELPER_POOLS:
        fail(f"--pool {pool!r}: choose {' or '.join(HELPER_POOLS)}")
    if pool != "thread" and ray is not None:
        fail("--pool process is for one machine; with --ray the Ray workers are the processes")
    opts = InferOptions(
        batch_size,
        workers,
        overlay,
        probabilities,
        resume,
        strict,
        postprocess,
        screen,
        dicom_seg or store,
        mask_bits,
        pool,
        complete_shape,
    )
    if not out_dir.strip():
        fail("--out is empty; name the output folder")
    check_json_path(json_path)

    def body():
        from lungrt.inference.infer import gather_inputs

        items, pacs_inputs = gather_inputs(list(inputs), out_dir)
        if not items:
            fail("no supported images found in the inputs")
        if ray is not None:
            from lungrt.inference.ray import require_ray, run_infer_ray, runner_args_for

            require_ray()  # fail before any model work when the extra is missing
        with open_runner(
            model,
            arch=arch,
            onnx=onnx,
            engine=engine,
            backend=backend,
            precision=precision,
            convention=convention,
            log=out.print,
        ) as runner:
            if ray is None:
                return run_infer(runner, items, out_dir, opts), pacs_inputs
            args, spec, identity = runner_args_for(runner, model, arch), runner.spec, run_identity(runner, opts)
        return run_infer_ray(
            args,
            spec,
            items,
            out_dir,
            opts,
            address=ray,
            actors=actors,
            gpus_per_actor=gpus_per_actor,
            identity=identity,
            qc=runner.info.qc,
        ), pacs_inputs

    summary, pacs_inputs = run_guarded(body)
    qc = f" ({summary['qc_flagged']} flagged by QC)" if summary.get("qc_flagged") else ""
    if summary.get("screened_out"):
        qc += f", {summary['screened_out']} skipped by header screening"
    if summary.get("not_radiographs"):
        qc += f", {summary['not_radiographs']} not radiographs (SEG, SR, ...) skipped"
    run = summary.get("run", {})
    speed = f"{summary['images_per_second']:.1f} img/s" if summary["ok"] + summary["failed"] else "nothing left to do"
    if len(run.get("invocations", [])) > 1:
        whole = "n/a" if run.get("images_per_second") is None else f"{run['images_per_second']:.1f} img/s"
        speed += f" (whole run: {run['processed']} processed, {run['qc_flagged']} flagged by QC, {whole})"
    out.print(
        f"{summary['ok']} ok{qc}, {summary['failed']} failed, {summary['skipped_done']} already done; "
        f"{speed} on {summary['backend']} ({summary['model']}, {summary.get('convention', 'lung-field')}"
        + (f", sha256 {summary['artifact'][:16]}" if summary.get("artifact") else "")
        + "); "
        f"results: {summary['results_csv']}",
        highlight=False,
    )
    if store:
        from lungrt.inference.dicomweb import store_results
        from lungrt.inference.journal import read_records

        stored = run_guarded(
            lambda: store_results(Path(out_dir), pacs_inputs, read_records(Path(out_dir)), store_flagged)
        )
        summary["stored"] = stored
        for pacs in pacs_inputs:
            n = sum(s["pacs"] == pacs.root for s in stored["stored"])
            out.print(
                f"stored {n} DICOM SEG instance{'s' if n != 1 else ''} on {pacs.root} (study {pacs.study})",
                highlight=False,
            )
        if stored["stored_before"]:
            out.print(f"({stored['stored_before']} stored by an earlier run)", highlight=False)
        if stored["held_qc_flagged"]:
            out.print(
                f"{len(stored['held_qc_flagged'])} SEG(s) of QC-flagged films kept local (--store-flagged sends them)",
                highlight=False,
            )
    write_json(json_path, summary)
    if report:
        from lungrt.inference.report import write_report

        out.print(f"report: {run_guarded(lambda: write_report(Path(out_dir)))}", highlight=False)
    raise typer.Exit(EXIT_SOME_FAILED if summary["failed"] else EXIT_OK)


@app.command("report")
def report_cmd(out_dir: Path = typer.Argument(..., help="The --out folder of a finished `lungrt infer` run.")):
    """Write OUT/report.html: summary, distributions, QC-flagged images first, a sortable table."""
    from lungrt.inference.report import write_report

    out.print(f"wrote {run_guarded(lambda: write_report(out_dir))}", highlight=False)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("lungrt-demo"), "--out", help="Where the demo writes everything."),
    model: str = typer.Option(DEFAULT_MODEL, help="Shipped model name or checkpoint."),
    count: int = typer.Option(12, min=1, help="How many synthetic X-rays to generate."),
):
    """The main job on embedded data: synthetic X-rays -> best backend here -> infer with overlays,
    parity against PyTorch, and a short benchmark. No data or network needed."""
    from lungrt.demo import run_demo

    r = run_guarded(lambda: run_demo(out_dir, model, count, log=out.print))
    p, b, i = r["parity"], r["benchmark"], r["infer"]
    out.print(f"\n[bold]lungrt demo[/] ({r['model']} on {r['backend']})", highlight=False)
    out.print(
        f"  infer:     {i['ok']} X-rays segmented, {i.get('qc_flagged', 0)} flagged by QC, {i['failed']} failed",
        highlight=False,
    )
    out.print(f"  outputs:   masks + overlays in {out_dir / 'masks'}", highlight=False)
    out.print(
        f"  parity:    mask agreement with PyTorch {p['mask_agreement']:.5f}, max |dp| {p['max_abs_prob_diff']:.2e} "
        f"-> {'PASS' if p['gate']['passed'] else 'FAIL'}",
        highlight=False,
    )
    if p.get("note"):
        out.print(f"             {p['note']}", highlight=False)
    if "dice_candidate" in p:
        out.print(
            f"  accuracy:  Dice vs the phantoms' true lung masks {p['dice_candidate']:.4f} "
            "(synthetic chest films; the model never saw them)",
            highlight=False,
        )
    out.print(
        f"  speed:     {b['candidate_img_s']:.1f} img/s vs PyTorch eager FP32 {b['torch_fp32_img_s']:.1f} img/s "
        f"({b['speedup']:.2f}x), batch 8",
        highlight=False,
    )
    out.print(
        f"  look at:   {out_dir / 'overview.png'} (red: predicted lungs, green: true outline); "
        f"table: {out_dir / 'masks' / 'results.csv'}; report: {out_dir / 'demo_report.json'}",
        highlight=False,
    )
    raise typer.Exit(0 if p["gate"]["passed"] else 1)


def _robustness_cmd(models, onnx, arch, data, split, seed, out_dir, json_path) -> None:
    from lungrt.data.datasets import select_split
    from lungrt.evaluation.robustness import run_robustness, severity_summary, worst_cases_png
    from lungrt.backends.select import open_runner

    def body():
        pairs = select_split(data, split, seed)
        results = []
        for ref in [None] if onnx else models:
            with open_runner(ref, onnx=onnx, arch=arch, backend="auto" if onnx else "torch") as runner:
                res = run_robustness(runner, pairs)
            label = Path(onnx).name if onnx else ref
            if out_dir:
                png = worst_cases_png(
                    res,
                    out_dir / f"{_stem(label)}_robustness_worst.png",
                )
                out.print(f"wrote {png}")
            res.pop("worst")
            results.append((label, res))
        return results

    results = run_guarded(body)
    for label, res in results:
        table = Table(title=f"{label}: synthetic abnormalities over the gold lung field, {data} / {split}")
        for col in ("kind", "severity", "Dice", "drop vs clean", "share losing > 0.05", "worst drop"):
            table.add_column(col, justify="left" if col in ("kind", "severity") else "right")
        for r in res["rows"]:
            table.add_row(
                r["kind"],
                r["severity"],
                f"{r['dice']:.4f}",
                f"{r['dice_drop']:+.4f}",
                f"{r['share_losing_over_0.05']:.1%}",
                f"{r['worst_drop']:.3f}",
            )
        out.print(table)
        out.print(
            "mean drop by severity: " + ", ".join(f"{k} {v:+.4f}" for k, v in severity_summary(res["rows"]).items()),
            highlight=False,
        )
    write_json(json_path, {"data": str(data), "split": split, "results": dict(results)})


SHORT_BACKEND = {
    "onnxruntime": "ort",
    "openvino": "ov",
    "tensorrt": "trt",
    "tensorrt-rtx": "trt-rtx",
    "torch-compile": "torch-comp",
    "torch-cudagraph": "torch-graph",
}


def _csv_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@app.command()
def bench(
    model: str = typer.Option(DEFAULT_MODEL, help="Checkpoint, run folder or shipped name."),
    arch: Optional[str] = typer.Option(None, help="Architecture for bare weights."),
    backends: str = typer.Option(
        "torch,onnxruntime,openvino",
        help="Comma list: torch, torch-cl, torch-compile, torch-cudagraph, onnxruntime, openvino, tensorrt",
    ),
    variants: str = typer.Option(
        "fp32,bf16,int8",
        help=(
            "Comma list of precisions: fp32, fp16, bf16 (OpenVINO's mode; "
            "torch autocast), int8 (each backend's own recipe)."
        ),
    ),
    batch_sizes: str = typer.Option("1,8", help="Comma list of batch sizes."),
    size: Optional[int] = typer.Option(None, help="Input size (must match the model's spec)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    warmup: int = typer.Option(2, min=0),
    iters: int = typer.Option(
        10,
        min=1,
        help=(
            "Timed calls per configuration per round (ratios are of medians: "
            "3 x 10 calls hold a median steady on a shared machine)."
        ),
    ),
    rounds: int = typer.Option(3, min=1, help="Interleaved rounds over all configurations."),
    calib: Optional[Path] = typer.Option(
        None,
        help="INT8 calibration folder; a labelled dataset also gates INT8 on its "
        "validation split (default: synthetic phantoms, INT8 not gated).",
    ),
    engine: List[Path] = typer.Option([], help="TensorRT plan(s) to add as tensorrt rows (repeatable)."),
    json_path: Optional[Path] = typer.Option(None, "--json"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG chart."),
):
    """Throughput, latency p50/p90/p99, memory and GFLOP/s of each configuration, with the ratio
    to PyTorch eager FP32 measured in the same run."""
    import torch

    from lungrt.benchmark.bench import bench_model, plot_bench
    from lungrt.models.checkpoint import resolve_model

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    try:
        sizes = [int(b) for b in _csv_list(batch_sizes)]
    except ValueError:
        fail(f"--batch-sizes {batch_sizes!r}: give positive whole numbers, e.g. 1,8")
    if not sizes or min(sizes) < 1:
        fail(f"--batch-sizes {batch_sizes!r}: every batch size must be at least 1")
    check_json_path(json_path)

    def body():
        return bench_model(
            resolve_model(model, arch=arch),
            _csv_list(backends),
            _csv_list(variants),
            sizes,
            size,
            warmup,
            iters,
            rounds,
            dev,
            calib,
            engine,
            log=out.print,
        )

    result = run_guarded(body)
    hw = result["hardware"]
    table = Table(
        title=f"{result['model']} @ {result['input_size']}px, {rounds} rounds x {iters} calls\n"
        f"{hw['gpu'] or hw['cpu']} ({hw['cpu_count']} cores; "
        f"{' '.join(hw.get('cpu_flags') or [hw['torch_cpu_capability']])})"
    )
    # fits an 80-column terminal: short names, the columns people compare; the JSON keeps everything
    for col in ("backend", "prec", "batch", "img/s", "min-max", "p50 ms", "p99 ms", "x eager"):  # x eager: of medians
        table.add_column(col, justify="left" if col in ("backend", "prec") else "right", no_wrap=True)
    notes = []
    for r in result["rows"]:
        name = SHORT_BACKEND.get(r["backend"], r["backend"])
        if "skipped" in r or "error" in r:
            why = "skipped" if "skipped" in r else "[red]ERROR[/]"
            note = f"{name} {r['variant']}: {why}: {escape(r.get('skipped') or r.get('error'))}"
            if note not in notes:  # one line per backend and precision, not per batch size
                notes.append(note)
            table.add_row(name, r["variant"], str(r["batch"]), "-", why, "", "", "")
            continue
        table.add_row(
            name,
            r["variant"],
            str(r["batch"]),
            f"{r['img_per_s']:.1f}",
            f"{r['img_per_s_min']:.0f}-{r['img_per_s_max']:.0f}",
            f"{r['latency_ms_p50']:.0f}",
            f"{r['latency_ms_p99']:.0f}",
            f"{r['vs_torch_eager_fp32']:.2f}x" if r["vs_torch_eager_fp32"] else "-",
        )
    out.print(table)
    if any(r["variant"] == "int8" and "img_per_s" in r for r in result["rows"]):
        notes.append(
            "int8: each backend's own recipe, "
            + (
                "gated on the validation split of --calib"
                if result.get("int8_gated")
                else "calibrated on phantoms and NOT gated (pass --calib DATASET)"
            )
        )
    for note in dict.fromkeys(notes):
        out.print(note, highlight=False)
    for warning in result.get("warnings", []):
        Console(stderr=True).print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False)
    write_json(json_path, result)
    if plot:
        plot_bench(result, plot)
        out.print(f"wrote {plot}")
    errors = [r for r in result["rows"] if "error" in r]
    if errors:
        fail(
            f"{len(errors)} configuration(s) failed: "
            + "; ".join(f"{r['backend']} {r['variant']} b{r['batch']}: {r['error']}" for r in errors),
            code=1,
        )


@app.command()
def build(
    model: Optional[str] = typer.Option(
        None,
        help=(
            f"Checkpoint, run folder or shipped name (default {DEFAULT_MODEL}; "
            f"with --onnx: the weights it was made from, to verify against)."
        ),
    ),
    arch: Optional[str] = typer.Option(None, help="Architecture for bare weights."),
    onnx: Optional[Path] = typer.Option(None, help="Build from this precision-variant ONNX file instead."),
    precision: str = typer.Option("fp16", help="fp32 | fp16 | int8 | auto"),
    backend: str = typer.Option(
        "auto",
        help="auto | tensorrt | tensorrt-rtx | onnxruntime | openvino | cpu (with --precision auto: "
        "the fastest CPU engine x precision that passes, or within 10% of it the most faithful, used by infer/demo "
        "from then on)",
    ),
    target: Optional[str] = typer.Option(
        None, help="tensorrt-rtx: compute capabilities to build for, e.g. sm86,sm89 (default sm86: RTX 3090 class)."
    ),
    calib: Optional[Path] = typer.Option(None, help="INT8 calibration folder (a dataset: its train split)."),
    method: Optional[str] = typer.Option(
        None,
        help=(
            "INT8 calibration: entropy | minmax | percentile (default: each "
            "engine's own: entropy for TensorRT, minmax for ONNX Runtime's "
            "CPU INT8; OpenVINO's is NNCF's)."
        ),
    ),
    data: Optional[Path] = typer.Option(
        None,
        help=(
            "Labelled dataset whose validation split gates and verifies the "
            "build (default: 16 generated phantoms: drawings, said so in every "
            "gate line; a CPU choice gated on them is not recorded for infer)."
        ),
    ),
    batch: str = typer.Option("1,8,16", help="Optimization profile MIN,OPT,MAX batch."),
    workspace: float = typer.Option(4.0, help="TensorRT workspace limit in GiB."),
    out_dir: Optional[Path] = typer.Option(
        None, "--out", help="Where engines and variants go (default: $LUNGRT_CACHE/engines, printed)."
    ),
    rebuild_stale: bool = typer.Option(
        False,
        "--rebuild",
        "--rebuild-stale",
        help="Rebuild even when the engine is up to date (--rebuild-stale: the older name).",
    ),
    search_minutes: float = typer.Option(
        10.0,
        "--search-minutes",
        min=0.1,
        help=(
            "Bound on each INT8 search (NNCF's accuracy control on OpenVINO, "
            "the block search elsewhere): it prints a line per step and gives "
            "up past this. Expect 1-10 min on 2 cores when INT8 misses its "
            "gate at first."
        ),
    ),
):
    """Compile the model for deployment and verify it: a strongly typed TensorRT engine (standard
    TensorRT on its GPU, or TensorRT-RTX ahead of time for RTX GPUs), else the ONNX Runtime variant.
    `--precision auto` keeps the fastest variant that passes parity (within 10% of it, the most faithful)."""
    from lungrt.build import census_text, run_build

    if out_dir is None:  # never the current folder unless asked
        from lungrt.core.cache import engines_dir

        out_dir = engines_dir()
        out.print(f"engines and variants go to {out_dir} (--out to choose)", highlight=False)

    def body():
        return run_build(
            model,
            onnx,
            precision,
            backend,
            target,
            calib,
            method,
            data,
            batch,
            workspace,
            out_dir,
            rebuild_stale,
            arch,
            log=out.print,
            search_minutes=search_minutes,
        )

    result = run_guarded(body)
    if "choice" in result:
        out.print(Path(result["report"]).read_text(), highlight=False, markup=False)
        if result.get("record"):
            out.print(f"recorded for infer/demo on this CPU: {result['record']}", highlight=False)
    else:
        if result.get("census"):
            out.print(f"compute dtypes of the compiled graph: {census_text(result['census'])}", highlight=False)
        out.print(f"built {result['path']} ({result['backend']}, {result['precision']})", highlight=False)


@app.command()
def package(
    engine: Path = typer.Option(..., help="A TensorRT plan built by `lungrt build` (its .json metadata beside it)."),
    triton: Path = typer.Option(..., help="Triton model repository folder to write into."),
    name: Optional[str] = typer.Option(None, help="Model name in the repository."),
):
    """Export a plan as a Triton model (config.pbtxt + 1/model.plan)."""
    from lungrt.backends.tensorrt.engine import export_triton

    model_dir = run_guarded(lambda: export_triton(engine, triton, name))
    out.print(f"wrote {model_dir / 'config.pbtxt'} and {model_dir / '1' / 'model.plan'}", highlight=False)


def entrypoint() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    entrypoint()
