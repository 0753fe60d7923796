"""The checkpoints shipped inside the package: present, loadable with no data or network, with the
test-split metrics they were shipped with, and sensible on an X-ray-like input. Plus `lungrt demo`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lungrt.models.checkpoint import resolve_model, shipped_checkpoint
from lungrt.cli import app
from lungrt.export.onnx import reference_inputs
from lungrt.models import REGISTRY
from lungrt.backends.pytorch import TorchRunner

from .conftest import REAL_DATA, needs_real_data


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_shipped_checkpoint_loads_and_meets_its_targets(name):
    path = shipped_checkpoint(name)
    assert path is not None, f"no shipped weights for {name}"
    assert path.stat().st_size < 10e6  # fp16, a few MB
    loaded = resolve_model(name)
    assert loaded.spec.equalization == "histogram" and loaded.spec.size >= 256
    assert loaded.info.qc.get("bounds"), "shipped models carry fitted QC thresholds"
    prob = TorchRunner(loaded).run(reference_inputs(loaded.spec, 2))
    lung_fraction = (prob > 0.5).mean()
    assert 0.1 < lung_fraction < 0.5  # finds lung fields in the phantoms, not all or nothing


@needs_real_data
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_shipped_model_segments_real_test_xrays(name):
    """Measured, not read back: Dice on every 8th test-split X-ray (27 images) at native size."""
    from lungrt.backends.onnxruntime import OnnxRuntimeRunner
    from lungrt.data.datasets import select_split
    from lungrt.evaluation.evaluate import evaluate
    from lungrt.build.variants import make_variant

    loaded = resolve_model(name)
    pairs = select_split(REAL_DATA, "test")[::8]
    with OnnxRuntimeRunner(make_variant(loaded, "fp32").path) as r:
        mean = evaluate(r, pairs, postprocess=True)["mean"]
    assert mean["dice"] >= 0.955 and mean["accuracy"] >= 0.97, mean


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--count", "4"], env={"COLUMNS": "80"}, terminal_width=80)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "demo_report.json").read_text())
    assert report["infer"]["ok"] == 4 and report["parity"]["gate"]["passed"]
    # the demo's chest-film-like phantoms read as chest films to the shipped model
    # (target: Dice >= 0.92, <= 2 of 12 flagged)
    assert report["parity"]["dice_candidate"] >= 0.92 and report["infer"]["qc_flagged"] <= 1, report
    assert (out / "overview.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((out / "masks").rglob("*.overlay.png"))) == 4
    assert "overview.png" in res.output
    # at 80 columns no path is broken across lines (the summary is soft-wrapped: one line per fact)
    assert str(out / "overview.png") in res.output and str(out / "masks") in res.output
