"""`lungrt train`, `eval` (and `--robustness`), `data check` and `models`: parsing and printing only."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lungrt.cli._app import app, data_app, out, run_guarded, write_json
from lungrt.core.defaults import DEFAULT_MODEL


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
    from lungrt.evaluation.evaluate import behind_heart_line
    from lungrt.jobs import evaluate_models

    def warn(text: str) -> None:
        Console(stderr=True).print(f"[bold yellow]warning:[/] {escape(text)}", highlight=False)

    results = run_guarded(
        lambda: evaluate_models(
            model, data, split, seed, batch_size, postprocess, out_dir, onnx, arch, convention, warn
        )
    )
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


def _robustness_cmd(models, onnx, arch, data, split, seed, out_dir, json_path) -> None:
    from lungrt.evaluation.robustness import severity_summary
    from lungrt.jobs import robustness_models

    results = run_guarded(lambda: robustness_models(models, data, split, seed, out_dir, onnx, arch))
    for label, res in results:
        if res.get("worst_png"):
            out.print(f"wrote {res.pop('worst_png')}")
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
