"""QC's second opinion: a lung-field mask that covers too little of the same architecture's whole-lung mask is
flagged stops_short, through the one stream (API, infer with both helper pools), and only against a bound fitted
with those very whole-lung weights."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from lungrt.backends.base import Runner
from lungrt.backends.second_opinion import SecondOpinionRunner
from lungrt.core.errors import LungrtError
from lungrt.core.modelinfo import ModelInfo
from lungrt.core.spec import LUNG_FIELD, WHOLE_LUNG, PreprocessSpec
from lungrt.data.phantoms import make_phantom

SIZE = 64
FIELD_SPEC = PreprocessSpec(size=SIZE, convention=LUNG_FIELD)
WHOLE_SPEC = replace(FIELD_SPEC, convention=WHOLE_LUNG)
BOUND = 0.7
FITTED = {"bounds": {"whole_lung_cover": [BOUND, None]}, "second_opinion": {"model": "box", "weights_hash": "w-1"}}


class FakeBoxRunner(Runner):
    """Glue only, no network: every film's lungs are two boxes `rows` tall (each 8 px wide, 20 px apart)."""

    backend = "fake"

    def __init__(self, rows: int, spec: PreprocessSpec, weights: str, qc: dict | None = None):
        self.spec, self.weights_id, self.rows = spec, weights, rows
        self.info = ModelInfo("box", 4, spec, qc=qc or {})
        self.batches = 0

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.batches += 1
        out = np.zeros((len(batch), 1, SIZE, SIZE), np.float32)
        out[:, :, 12 : 12 + self.rows, 14:22] = 1.0
        out[:, :, 12 : 12 + self.rows, 42:50] = 1.0
        return out


def second_opinion(field_rows: int, whole_rows: int = 40) -> SecondOpinionRunner:
    field = FakeBoxRunner(field_rows, FIELD_SPEC, "f-1", FITTED)
    return SecondOpinionRunner(field, FakeBoxRunner(whole_rows, WHOLE_SPEC, "w-1"))


def films(n: int) -> list[np.ndarray]:
    return [make_phantom(seed, SIZE).image.astype(np.float32) for seed in range(n)]


def test_the_api_flags_a_mask_that_covers_too_little_of_the_whole_lung():
    from lungrt.api import LungSegmenter

    short = LungSegmenter(second_opinion(field_rows=20), "fake").predict(films(3))  # covers half the whole lung
    assert [r.qc for r in short] == ["stops_short"] * 3
    assert [r.qc_features["whole_lung_cover"] for r in short] == [0.5] * 3
    full = LungSegmenter(second_opinion(field_rows=36), "fake").predict(films(3))  # covers 0.9 of it
    assert [r.qc for r in full] == ["ok"] * 3 and full[0].qc_features["whole_lung_cover"] == 0.9


def test_without_the_second_opinion_the_bound_is_not_checked():
    from lungrt.api import LungSegmenter

    alone = LungSegmenter(FakeBoxRunner(20, FIELD_SPEC, "f-1", FITTED), "fake").predict(films(2))
    assert [r.qc for r in alone] == ["ok", "ok"] and "whole_lung_cover" not in alone[0].qc_features


@pytest.mark.parametrize("pool", ["thread", "process"])
def test_infer_writes_the_cover_and_the_flag_with_either_helper_pool(tmp_path, pool):
    from lungrt.data.io import write_png
    from lungrt.inference.infer import InferOptions, run_infer
    from lungrt.inference.inputs import collect_inputs

    for k, image in enumerate(films(3)):
        write_png(tmp_path / "in" / f"{k}.png", (image * 255).astype(np.uint8))
    runner = second_opinion(field_rows=20)
    summary = run_infer(runner, collect_inputs([str(tmp_path / "in")]), tmp_path / "out", InferOptions(pool=pool))

    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert summary["qc_flagged"] == 3 and summary["backend"] == "fake/cpu/fp32+whole-lung"
    assert [r["qc"] for r in rows] == ["stops_short"] * 3
    assert [float(r["qc_whole_lung_cover"]) for r in rows] == [0.5] * 3
    assert runner.reference.batches == runner.runner.batches == 1  # the same batch, once each


def test_a_second_opinion_is_refused_where_its_bound_does_not_belong():
    field = FakeBoxRunner(20, FIELD_SPEC, "f-1", FITTED)
    whole = FakeBoxRunner(40, WHOLE_SPEC, "w-1")
    refusals = {
        "fitted with box weights w-1": (field, FakeBoxRunner(40, WHOLE_SPEC, "w-2")),  # other whole-lung weights
        "hold no bound": (FakeBoxRunner(20, FIELD_SPEC, "f-1"), whole),  # never fitted with one
        "must be a whole-lung model": (field, FakeBoxRunner(40, FIELD_SPEC, "w-1")),
        "segments whole lungs already": (FakeBoxRunner(20, WHOLE_SPEC, "f-1", FITTED), whole),
        "prepares its input otherwise": (field, FakeBoxRunner(40, replace(WHOLE_SPEC, equalization="clahe"), "w-1")),
    }
    for why, (primary, reference) in refusals.items():
        with pytest.raises(LungrtError, match=why):
            SecondOpinionRunner(primary, reference)


def test_the_fit_keeps_the_cover_within_the_false_alarm_budget_of_every_framing(phantom_dir):
    from lungrt.data.datasets import select_split
    from lungrt.inference.qc import QCThresholds, collect_features, fit_for_model, flags

    class FakeDarkRunner(FakeBoxRunner):  # glue: the phantom's lungs are its darkest pixels
        def run(self, batch):
            return (batch < np.quantile(batch, self.rows / 100, axis=(2, 3), keepdims=True)).astype(np.float32)

    field = FakeDarkRunner(18, replace(FIELD_SPEC, size=128), "f-1")
    whole = FakeDarkRunner(24, replace(WHOLE_SPEC, size=128), "w-1")
    train, val = select_split(phantom_dir, "train"), select_split(phantom_dir, "val")
    fitted = fit_for_model(field, train, val, min_recall=None, reference=whole)

    again = QCThresholds.from_dict(fitted.to_dict())
    assert again.bounds["whole_lung_cover"][0] is not None and again.bounds["whole_lung_cover"][1] is None
    assert again.reference == {"model": "box", "convention": WHOLE_LUNG, "weights_hash": "w-1"}
    for framing in (None, "padded", "cropped", "downsampled"):
        feats = collect_features(field, val, shape=fitted.shape, framing=framing, reference=whole)
        assert np.mean([bool(flags(f, again)) for f in feats]) <= max(0.05, fitted.false_alarm_val)
    # and what it is for: the same films with a lung-field mask a third the size are flagged stops_short
    short = FakeDarkRunner(6, replace(FIELD_SPEC, size=128), "f-1")
    feats = collect_features(short, val, shape=fitted.shape, reference=whole)
    assert all("stops_short" in flags(f, again) for f in feats)


def test_shipped_lung_field_weights_carry_a_bound_fitted_with_the_shipped_whole_lung_weights():
    from lungrt.build.resolve import open_runner

    with open_runner("unet", backend="torch", second_opinion=True) as runner:
        assert isinstance(runner, SecondOpinionRunner) and runner.reference.spec.convention == WHOLE_LUNG
        assert runner.identity()["second_opinion"]["weights_hash"] == runner.info.qc["second_opinion"]["weights_hash"]
    with pytest.raises(LungrtError, match="segments whole lungs already"):
        open_runner("unet", backend="torch", convention=WHOLE_LUNG, second_opinion=True)


def test_infer_cli_second_opinion_and_a_resume_without_it_is_refused(tmp_path):
    from typer.testing import CliRunner

    from lungrt.cli import app
    from lungrt.data.io import write_png

    for k, image in enumerate(films(2)):
        write_png(tmp_path / "in" / f"{k}.png", (image * 255).astype(np.uint8))
    base = ["infer", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--model", "unet", "--backend", "torch"]
    res = CliRunner().invoke(app, [*base, "--second-opinion"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert all(0.0 <= float(r["qc_whole_lung_cover"]) <= 1.0 for r in rows) and len(rows) == 2
    assert "+whole-lung" in res.output
    res = CliRunner().invoke(app, [*base, "--resume"])
    assert res.exit_code == 2 and "second_opinion" in res.output
    res = CliRunner().invoke(app, [*base, "--second-opinion-model", str(Path("nowhere.onnx"))])
    assert res.exit_code == 2 and "needs --second-opinion" in res.output


def test_ray_actors_carry_the_second_opinion_to_the_writer_tasks(tmp_path):
    """Ray's glue without a cluster (tests/test_ray.py runs real ones): the actor's batch carries the whole-lung
    probabilities, the writer task flags from them, and the driver asks every actor for the same second opinion."""
    import json

    from lungrt.data.io import write_png
    from lungrt.inference.outputs import read_records
    from lungrt.inference.ray import InferActor, _read, _write, runner_args_for

    write_png(tmp_path / "a.png", (films(1)[0] * 255).astype(np.uint8))
    row = _read(
        {"source": "a.png", "abs": str(tmp_path / "a.png"), "rel": "a.png", "known_error": ""}, FIELD_SPEC.to_json()
    )
    actor = InferActor({}, 2, opener=lambda **kw: second_opinion(field_rows=20))
    batch = actor({k: np.stack([row[k]]) for k in ("tensor",)})
    assert batch["reference"].shape == (1, SIZE, SIZE)
    row = {**row, "prob": batch["prob"][0], "reference": batch["reference"][0], "runner": "r", "model": "box"}
    assert _write(row, str(tmp_path / "out"), FIELD_SPEC.to_json(), {}, json.dumps(FITTED))["qc"] == "stops_short"
    (record,) = read_records(tmp_path / "out").values()
    assert record["qc_whole_lung_cover"] == 0.5
    assert runner_args_for(second_opinion(20), "box", None)["second_opinion"] is True
