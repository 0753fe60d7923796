"""`lungrt build`, `export`, `parity` and `package`: option parsing and printing over `lungrt.build`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from lungrt.cli._app import app, out, run_guarded, write_json
from lungrt.core.defaults import DEFAULT_MODEL

METHOD_HELP = (
    "INT8 calibration: entropy | minmax | percentile (default: each engine's own: entropy for TensorRT, minmax "
    "for ONNX Runtime's CPU INT8; OpenVINO's is NNCF's)."
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
    method: Optional[str] = typer.Option(None, help=METHOD_HELP),
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
def export(
    model: str = typer.Option(DEFAULT_MODEL, help="Checkpoint, run folder or shipped name."),
    arch: Optional[str] = typer.Option(None, help="Architecture for bare .pt/.pth/.safetensors weights."),
    out_path: Path = typer.Option(..., "--out", help="Output .onnx file."),
    precision: str = typer.Option("fp32", help="fp32 | fp16 | int8"),
    calib: Optional[Path] = typer.Option(
        None, help="INT8 calibration folder (a dataset: its train split; else all images). Default: synthetic phantoms."
    ),
    method: Optional[str] = typer.Option(None, help=METHOD_HELP),
    val_data: Optional[Path] = typer.Option(
        None, help="Labelled dataset whose validation split gates INT8 (sensitive blocks are then left unquantized)."
    ),
):
    """Export to ONNX (opset 17, dynamic batch, metadata, simplified, checked against PyTorch),
    optionally as the FP16 or INT8 (explicit Q/DQ) variant."""
    from lungrt.jobs import export_variant

    v = run_guarded(lambda: export_variant(model, out_path, precision, calib, method, val_data, arch, out.print))
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
def package(
    engine: Path = typer.Option(..., help="A TensorRT plan built by `lungrt build` (its .json metadata beside it)."),
    triton: Path = typer.Option(..., help="Triton model repository folder to write into."),
    name: Optional[str] = typer.Option(None, help="Model name in the repository."),
):
    """Export a plan as a Triton model (config.pbtxt + 1/model.plan)."""
    from lungrt.backends.tensorrt import export_triton

    model_dir = run_guarded(lambda: export_triton(engine, triton, name))
    out.print(f"wrote {model_dir / 'config.pbtxt'} and {model_dir / '1' / 'model.plan'}", highlight=False)
