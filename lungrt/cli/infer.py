"""`lungrt infer`, `lungrt report` and `lungrt demo`: option parsing and printing over `lungrt.jobs` and the library."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lungrt.cli._app import (
    SECOND_OPINION_HELP,
    SECOND_OPINION_MODEL_HELP,
    app,
    check_json_path,
    fail,
    out,
    run_guarded,
    second_opinion_arg,
    write_json,
)
from lungrt.core.defaults import DEFAULT_MODEL


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
    second_opinion: bool = typer.Option(False, "--second-opinion", help=SECOND_OPINION_HELP),
    second_opinion_model: Optional[Path] = typer.Option(None, "--second-opinion-model", help=SECOND_OPINION_MODEL_HELP),
    ray: Optional[str] = typer.Option(
        None, "--ray", help="Run on Ray: 'local' (start one here), 'auto', or a cluster address."
    ),
    actors: int = typer.Option(1, min=1, help="--ray: inference actors (one runner each)."),
    gpus_per_actor: float = typer.Option(0.0, min=0.0, help="--ray: GPUs reserved per actor."),
):
    """Lung masks and measurements for folders of X-rays. Exit 0: all ok; 3: some inputs failed
    (see results.csv); 2: bad arguments or model."""
    from lungrt.inference.infer import EXIT_OK, EXIT_SOME_FAILED, HELPER_POOLS, InferOptions
    from lungrt.inference.stream import SCREEN_CHOICES
    from lungrt.jobs import infer_job

    if screen not in SCREEN_CHOICES:
        fail(f"--screen {screen!r}: choose flag or skip")
    if mask_bits not in (1, 8):
        fail(f"--mask-bits {mask_bits}: choose 1 or 8")
    if pool not in HELPER_POOLS:
        fail(f"--pool {pool!r}: choose {' or '.join(HELPER_POOLS)}")
    if pool != "thread" and ray is not None:
        fail("--pool process is for one machine; with --ray the Ray workers are the processes")
    if not out_dir.strip():
        fail("--out is empty; name the output folder")
    check_json_path(json_path)
    opts = InferOptions(
        batch_size, workers, overlay, probabilities, resume, strict, postprocess, screen, dicom_seg or store,
        mask_bits, pool, complete_shape,
    )  # fmt: skip
    open_args = dict(source=model, arch=arch, onnx=onnx, engine=engine, backend=backend, precision=precision)
    summary = run_guarded(
        lambda: infer_job(
            list(inputs),
            out_dir,
            opts,
            None,
            {
                **open_args,
                "convention": convention,
                "second_opinion": second_opinion_arg(second_opinion, second_opinion_model),
            },
            ray,
            actors,
            gpus_per_actor,
            store,
            store_flagged,
            log=out.print,
        )  # fmt: skip
    )
    out.print(summary_line(summary), highlight=False)
    if store:
        _print_stored(summary)
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


def summary_line(summary: dict) -> str:
    """One line for a finished run: counts, speed, what ran (with its content hash) and where results are."""
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
    artifact = f", sha256 {summary['artifact'][:16]}" if summary.get("artifact") else ""
    return (
        f"{summary['ok']} ok{qc}, {summary['failed']} failed, {summary['skipped_done']} already done; {speed} on "
        f"{summary['backend']} ({summary['model']}, {summary.get('convention', 'lung-field')}{artifact}); "
        f"results: {summary['results_csv']}"
    )


def _print_stored(summary: dict) -> None:
    stored = summary["stored"]
    for pacs in summary["pacs_inputs"]:
        n = sum(s["pacs"] == pacs["root"] for s in stored["stored"])
        out.print(f"stored {n} DICOM SEG instance{'s' if n != 1 else ''} on {pacs['root']} (study {pacs['study']})")
    if stored["stored_before"]:
        out.print(f"({stored['stored_before']} stored by an earlier run)", highlight=False)
    if stored["held_qc_flagged"]:
        n = len(stored["held_qc_flagged"])
        out.print(f"{n} SEG(s) of QC-flagged films kept local (--store-flagged sends them)", highlight=False)
