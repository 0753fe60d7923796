"""`lungrt doctor` and `lungrt bench`: parsing and printing only."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lungrt._version import __version__
from lungrt.cli._app import app, check_json_path, fail, out, run_guarded, write_json
from lungrt.core.defaults import DEFAULT_MODEL


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
