"""The command line as a user drives it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lungrt.cli import app

from .conftest import REAL_DATA, needs_real_data

runner = CliRunner()


def test_help_lists_the_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("doctor", "data", "models", "train", "eval", "export", "parity"):
        assert cmd in res.output


def _commands(group, prefix=()):
    import click

    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


def test_every_help_reads_at_80_columns():
    """Every option name whole (never cut with an ellipsis), no line past 80 columns, booleans as flags."""
    import typer

    group = typer.main.get_command(app)
    commands = list(_commands(group))
    assert len(commands) >= 12
    for path, cmd in commands:
        res = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"}, terminal_width=80)
        assert res.exit_code == 0, (path, res.output)
        lines = res.output.splitlines()
        assert all(len(line) <= 80 for line in lines), (path, max(lines, key=len))
        assert "\u2026" not in res.output and "<bool>" not in res.output, path
        for param in cmd.params:
            for opt in param.opts + param.secondary_opts:
                if opt.startswith("--"):
                    assert opt in res.output, (path, opt)


def test_doctor_exits_zero_and_explains_tensorrt():
    from lungrt.doctor import tensorrt_status

    res = runner.invoke(app, ["doctor"])
    assert res.exit_code == 0, res.output
    ok, why = tensorrt_status()
    assert "backend tensorrt" in res.output
    if not ok:  # this CPU machine: unavailable, with the reason and what to install
        assert "unavailable" in res.output and "lungrt[trt]" in why


def test_data_check_on_phantoms(phantom_dir, tmp_path):
    res = runner.invoke(app, ["data", "check", str(phantom_dir), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["pairs"] == 24 and not report["unreadable"]
    assert all(set(s["by_source"]) == {"PHA", "PHB"} for s in report["splits"].values())


def test_data_check_missing_folder_is_one_line_error(tmp_path):
    res = runner.invoke(app, ["data", "check", str(tmp_path / "nope")])
    assert res.exit_code == 2
    assert "nope" in res.output and "Traceback" not in res.output


def test_models_table():
    res = runner.invoke(app, ["models", "--size", "64", "--width", "4"])
    assert res.exit_code == 0
    for name in ("unet", "gsconv-unet", "msag-unet"):
        assert name in res.output


def test_train_then_eval_writes_run_files(phantom_dir, tmp_path):
    run = tmp_path / "run"
    res = runner.invoke(
        app,
        [
            "train",
            "--model",
            "unet",
            "--data",
            str(phantom_dir),
            "--out",
            str(run),
            "--epochs",
            "2",
            "--size",
            "64",
            "--width",
            "4",
            "--lr",
            "3e-3",
        ],
    )
    assert res.exit_code == 0, res.output
    for f in ("model.safetensors", "metrics.json", "loss_curves.png", "resume.pt"):
        assert (run / f).exists(), f
    assert len(json.loads((run / "metrics.json").read_text())["history"]) == 2
    res = runner.invoke(
        app,
        [
            "train",
            "--model",
            "unet",
            "--data",
            str(phantom_dir),
            "--out",
            str(run),
            "--epochs",
            "3",
            "--size",
            "64",
            "--width",
            "4",
            "--lr",
            "3e-3",
            "--resume",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "resumed" in res.output
    assert len(json.loads((run / "metrics.json").read_text())["history"]) == 3
    res = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(run),
            "--model",
            str(run / "model.safetensors"),
            "--data",
            str(phantom_dir),
            "--split",
            "test",
            "--out",
            str(tmp_path / "ev"),
            "--json",
            str(tmp_path / "ev.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "Dice" in res.output
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert len(ev["results"]) == 2
    assert (tmp_path / "ev" / "run_per_image.csv").exists() and (tmp_path / "ev" / "model_examples.png").exists()
    assert (tmp_path / "ev" / "model_worst.png").exists()
    header = (tmp_path / "ev" / "run_per_image.csv").read_text().splitlines()[0].split(",")
    assert header[-2:] == ["behind_heart_missed", "behind_heart_added"]
    assert "behind the heart" in res.output


def test_eval_on_known_case_scores_perfectly(tmp_path, phantom_dir):
    """A 'model' whose probability is the gold mask itself must score Dice 1: checks the whole
    eval path (preprocess, invert to native size, metrics) on a known answer."""
    import numpy as np

    from lungrt.models.checkpoint import ModelInfo
    from lungrt.data.datasets import discover_pairs
    from lungrt.evaluation.evaluate import evaluate
    from lungrt.data.io import read_mask
    from lungrt.core.spec import PreprocessSpec
    from lungrt.backends.base import Runner

    pairs = discover_pairs(phantom_dir).pairs[:4]
    spec = PreprocessSpec(size=128)  # phantoms are 128 px: the inverse resize is the identity

    class GoldRunner(Runner):  # a fake model for glue: returns each image's own gold mask
        backend, info = "fake", ModelInfo("gold", 0, spec)

        def __init__(self):
            self.spec, self.queue = spec, [read_mask(p.mask).astype(np.float32) for p in pairs]

        def run(self, batch):
            out = np.stack([self.queue.pop(0)[None] for _ in range(len(batch))])
            return out

    res = evaluate(GoldRunner(), pairs, batch_size=2)
    assert res["mean"]["dice"] == 1.0 and res["mean"]["hd95"] == 0.0 and res["mean"]["images"] == 4
    assert all(r["behind_heart_missed"] == r["behind_heart_added"] == 0.0 for r in res["per_image"])


def test_bad_checkpoint_is_one_line_error(tmp_path, phantom_dir):
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    res = runner.invoke(app, ["eval", "--model", str(tmp_path / "junk.safetensors"), "--data", str(phantom_dir)])
    assert res.exit_code == 2 and "junk.safetensors" in res.output and "Traceback" not in res.output


@needs_real_data
def test_data_check_on_the_real_xrays(tmp_path):
    res = runner.invoke(app, ["data", "check", str(REAL_DATA), "--json", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["pairs"] == 704 and not r["unmatched_images"] and not r["unmatched_masks"] and not r["unreadable"]
    sizes = {k: v["total"] for k, v in r["splits"].items()}
    assert sizes == {"train": 281, "val": 211, "test": 212}
    assert all(set(v["by_source"]) == {"MCUCXR", "CHNCXR"} for v in r["splits"].values())


def test_export_command_writes_checked_onnx(tmp_path, tiny_checkpoint):
    from lungrt.backends.base import onnx_metadata

    res = runner.invoke(
        app, ["export", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "m.onnx"), "--precision", "fp16"]
    )
    assert res.exit_code == 0, res.output
    meta = onnx_metadata(tmp_path / "m.onnx")
    assert meta["lungrt.export.precision"] == "fp16" and json.loads(meta["lungrt.model"])["name"] == "unet"


def test_fit_on_train_and_val_keeps_the_last_epoch_and_never_the_test_split(phantom_dir, tmp_path):
    from lungrt.data.datasets import select_split
    from lungrt.models.checkpoint import load_checkpoint
    from lungrt.training.train import TrainConfig, train

    cfg = TrainConfig(
        model="unet", width=4, size=64, epochs=3, lr=3e-3, batch_size=4, seed=0, augment=False, fit_on="train+val"
    )
    result = train(cfg, phantom_dir, tmp_path / "run", log=lambda *a: None)
    n_train, n_val = (len(select_split(phantom_dir, s, 0)) for s in ("train", "val"))
    assert result["fit_images"] == n_train + n_val < len(select_split(phantom_dir, "all", 0))
    info = load_checkpoint(tmp_path / "run" / "model.safetensors").info
    assert info.metrics["epoch"] == 3 and info.metrics["fit_on"] == "train+val"
    with pytest.raises(ValueError, match="fit_on"):
        train(TrainConfig(fit_on="everything"), phantom_dir, tmp_path / "bad", log=lambda *a: None)
