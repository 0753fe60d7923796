"""`lungrt demo`: the whole pipeline on embedded synthetic X-rays, no data and no network needed.

Generates chest-film-like phantoms (with their exact lung masks), runs a shipped model on the best
backend here through `infer` with overlays, checks that backend against PyTorch (parity, with task
Dice against the phantom masks), times both, and draws an overview PNG.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from lungrt.models.checkpoint import resolve_model
from lungrt.data.datasets import discover_pairs
from lungrt.inference.infer import InferOptions, collect_inputs, run_infer
from lungrt.evaluation.parity import GATES, apply_gate, compare, throughput
from lungrt.data.phantoms import make_chest_phantom, write_phantom_dataset
from lungrt.core.plots import overlay
from lungrt.build.resolve import open_runner, recorded_cpu_choice
from lungrt.backends.pytorch import TorchRunner


def overview_png(out_dir: Path, pairs, masks_dir: Path, path: Path, cols: int = 4) -> None:
    from lungrt.data.io import read_mask, read_xray
    from lungrt.core.plots import figure

    n = len(pairs)  # every image of the demo, not a selection
    rows = (n + cols - 1) // cols
    fig = figure(figsize=(3 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, p in zip(axes.flat, pairs[:n]):
        pred = read_mask(masks_dir / f"{p.image.stem}.mask.png")
        ax.imshow(overlay(read_xray(p.image).pixels, pred, read_mask(p.mask)))
        ax.set_title(p.name, fontsize=9)
    fig.suptitle("lungrt demo: predicted lung field (red) vs phantom ground truth (green outline)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def recorded_choice_note(loaded, runner, gate: dict) -> str | None:
    """Why the recorded CPU choice can miss its gate here: it passed on real X-rays when recorded,
    and phantoms are drawings, whose uncertain pixels reduced precision moves."""
    choice = recorded_cpu_choice(loaded, log=lambda *_: None)
    if gate["passed"] or not choice or runner.describe() != f"{choice['backend']}/cpu/{choice['precision']}":
        return None
    when = (
        f" (mask agreement {choice['mask_agreement']:.5f} on {choice['gate_images']} images from {choice['gate_data']})"
        if "mask_agreement" in choice
        else ""
    )
    return (
        f"{choice['backend']} {choice['precision']} passed its gate when `lungrt build --backend cpu --precision auto` "
        f"recorded it{when}; these phantoms are drawings, and {choice['precision']} moves "
        f"uncertain pixels. On real X-rays: `lungrt parity --model {loaded.info.name} --backend {choice['backend']} "
        f"--variant {choice['precision']} --data DATASET`."
    )


def run_demo(
    out_dir: str | Path, model: str, count: int = 12, size: int = 320, log=logging.getLogger(__name__).info
) -> dict:
    out_dir = Path(out_dir)
    data = write_phantom_dataset(out_dir / "data", count, size=size, seed=2024, sources=("DEMO",), chest=True)
    pairs = discover_pairs(data).pairs
    loaded = resolve_model(model)
    report: dict = {"model": loaded.info.name, "images": len(pairs), "outputs": str(out_dir)}
    with open_runner(model, log=log) as runner:
        report["backend"] = runner.describe()
        log(f"[1/3] infer: {len(pairs)} phantom X-rays with {loaded.info.name} on {runner.describe()}")
        summary = run_infer(
            runner, collect_inputs([str(data / "images")]), out_dir / "masks", InferOptions(batch_size=4, overlay=True)
        )
        report["infer"] = summary
        log(f"[2/3] parity: {runner.describe()} vs torch/cpu/fp32")
        reference = TorchRunner(loaded)
        parity = compare(reference, runner, pairs, batch_size=4)
        gate = apply_gate(parity["summary"], GATES[runner.precision])
        report["parity"] = parity["summary"] | {"gate": gate, "note": recorded_choice_note(loaded, runner, gate)}
        log("[3/3] benchmark: batch 8, same inputs")
        batch = np.stack([loaded.spec.apply(make_chest_phantom(i, size).image) for i in range(8)])
        t_ref, t_cand = throughput(reference, batch, seconds=3), throughput(runner, batch, seconds=3)
        report["benchmark"] = {"torch_fp32_img_s": t_ref, "candidate_img_s": t_cand, "speedup": t_cand / t_ref}
    overview_png(out_dir, pairs, out_dir / "masks" / "images", out_dir / "overview.png")
    (out_dir / "demo_report.json").write_text(json.dumps(report, indent=2, default=str))
    return report
