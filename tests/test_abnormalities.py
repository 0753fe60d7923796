"""Synthetic abnormalities: painted where they should be, never into the other lung, reproducible."""

import numpy as np
import pytest

from lungrt.data.abnormalities import KINDS, SEVERITIES, paint_benchmark, paint_training, split_lungs
from lungrt.data.phantoms import make_phantom


@pytest.fixture(scope="module")
def phantom():
    p = make_phantom(3, 256)
    return p.image.astype(np.float32), p.mask.astype(bool)


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_benchmark_paint_is_reproducible_and_never_darkens(phantom, kind):
    image, mask = phantom
    a = paint_benchmark(image, mask, kind, "moderate", seed=11)
    assert np.array_equal(a, paint_benchmark(image, mask, kind, "moderate", seed=11))
    assert (a >= image - 1e-6).all()
    assert _changed(a, image)[mask].mean() > 0.05


def test_severity_paints_more_lung(phantom):
    image, mask = phantom
    for kind in KINDS:
        painted = [float((paint_benchmark(image, mask, kind, s, seed=5) - image)[mask].sum()) for s in SEVERITIES]
        assert painted == sorted(painted), kind


def test_only_silhouette_paints_past_the_lung_edge_and_never_into_the_other_lung(phantom):
    """Consolidation, haze and effusion stay inside the gold field (up to their feathered edge); the
    silhouette kind spills into the soft tissue around the lung, never into the other lung."""
    import cv2

    image, mask = phantom
    near = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    for kind in ("consolidation", "haze", "effusion"):
        assert not _changed(paint_benchmark(image, mask, kind, "severe", seed=2), image)[~near].any(), kind
    for seed in range(4):
        out = paint_benchmark(image, mask, "silhouette", "severe", seed=seed)
        changed = _changed(out, image)
        painted = [lung for lung in split_lungs(mask) if changed[lung].mean() > 0.3]
        assert len(painted) == 1
        other = mask & ~painted[0]
        assert not changed[other].any()
        assert changed[~near].sum() > 0.02 * mask.sum()  # over the edge, not only inside it


def test_spill_grows_past_the_edge_but_stops_short_of_the_other_lung(phantom):
    from lungrt.data.abnormalities import _spill

    _, mask = phantom
    lung, other = split_lungs(mask)
    grown = _spill(lung, other, reach=40)
    assert (grown & lung).sum() == lung.sum() and grown.sum() > 1.3 * lung.sum()
    assert not (grown & other).any()


def test_training_paint_sometimes_reaches_past_the_lung_edge(phantom):
    import cv2

    image, mask = phantom
    far = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)) == 0  # beyond any feathered edge
    past = [
        np.count_nonzero((paint_training(image, mask, np.random.default_rng(s)) - image > 0.02) & far)
        > 0.05 * mask.sum()
        for s in range(40)
    ]
    assert 3 <= sum(past) < 30  # the spill kind, a quarter of draws; the other kinds stay inside


def test_eval_robustness_scores_every_kind_and_severity_against_the_clean_image(tmp_path, tiny_checkpoint, phantom_dir):
    import json

    from typer.testing import CliRunner

    from lungrt.cli import app

    res = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_checkpoint),
            "--data",
            str(phantom_dir),
            "--split",
            "all",
            "--robustness",
            "--out",
            str(tmp_path),
            "--json",
            str(tmp_path / "r.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    ((label, result),) = json.loads((tmp_path / "r.json").read_text())["results"].items()
    rows = {(r["kind"], r["severity"]): r for r in result["rows"]}
    assert set(rows) == {("clean", "none")} | {(k, s) for k in KINDS for s in SEVERITIES}
    clean = rows[("clean", "none")]["dice"]
    for (kind, sev), r in rows.items():
        assert r["dice_drop"] == pytest.approx(clean - r["dice"], abs=1e-9), (kind, sev)
        assert r["images"] == rows[("clean", "none")]["images"]
    assert list(tmp_path.glob("*_robustness_worst.png"))
