"""The lung fields' statistical shape model: fitted on masks, carried with the model, and the QC
reason `implausible_shape` it gives (on synthetic chest phantoms: portable, no real data)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lungrt.data.phantoms import make_chest_phantom
from lungrt.inference.qc import FEATURES, REFRAMINGS, QCThresholds, features, fit_thresholds, flags, reframe
from lungrt.inference.shape import POINTS_PER_LUNG, ShapeModel, draw, pair_landmarks

SIZE = 128


def _masks(seeds) -> list[np.ndarray]:
    return [make_chest_phantom(int(s), SIZE).mask.astype(np.uint8) for s in seeds]


def _prob(mask: np.ndarray) -> np.ndarray:
    """A network-like probability map of a mask: sure inside, soft at the edge."""
    return cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 1.0)


def _lose_lower_half_of_one_lung(mask: np.ndarray, side: int) -> np.ndarray:
    """What a dense white-out over a lung's lower half does to a mask that follows the image."""
    out = mask.copy()
    half = slice(0, SIZE // 2) if side == 0 else slice(SIZE // 2, SIZE)
    ys = np.nonzero(out[:, half])[0]
    cut = int((ys.min() + ys.max()) / 2)
    out[cut:, half] = 0
    return out


def _reframe(mask: np.ndarray, how: str) -> np.ndarray:
    """The same film framed otherwise (`qc.reframe`), resized to the network's size as preprocessing does."""
    big = reframe(mask, how, mask)
    return (cv2.resize(big.astype(np.float32), (SIZE, SIZE), interpolation=cv2.INTER_LINEAR) > 0.5).astype(np.uint8)


@pytest.fixture(scope="module")
def fitted():
    """A shape model on 50 phantom masks; QC bounds from their features, checked on 30 others as
    they come and re-framed (as `fit_for_model` does)."""
    model = ShapeModel.fit([pair_landmarks(m) for m in _masks(range(100, 150))], "50 phantoms")
    train = [features(_prob(m), model) for m in _masks(range(100, 150))]
    val = {"as it comes": [features(_prob(m), model) for m in _masks(range(200, 230))]}
    val.update({how: [features(_prob(_reframe(m, how)), model) for m in _masks(range(200, 230))] for how in REFRAMINGS})
    return model, fit_thresholds(train, val, target=0.05)


def test_landmarks_run_from_apex_down_the_lateral_side_and_up_the_medial_side():
    mask = _masks([3])[0]
    points = pair_landmarks(mask)
    assert points.shape == (2 * POINTS_PER_LUNG, 2)
    right, left = points[:POINTS_PER_LUNG], points[POINTS_PER_LUNG:]  # the image-left lung first
    assert right[:, 0].mean() < SIZE / 2 < left[:, 0].mean()
    for lung, lateral_is_low_x in ((right, True), (left, False)):
        apex, base = lung[0], lung[POINTS_PER_LUNG // 2 - 1]
        assert apex[1] == lung[:, 1].min() and base[1] == lung[:, 1].max()
        lateral, medial = lung[1 : POINTS_PER_LUNG // 2 - 1], lung[POINTS_PER_LUNG // 2 :]
        assert (lateral[:, 0].mean() < medial[:, 0].mean()) == lateral_is_low_x
    filled = draw(points, mask.shape)
    dice = 2 * (filled & mask).sum() / (filled.sum() + mask.sum())
    assert dice > 0.95  # 32 landmarks per lung trace the outline


def test_shape_model_keeps_98_percent_and_round_trips(fitted):
    model, thresholds = fitted
    assert 1 <= len(model.variances) < 2 * 2 * POINTS_PER_LUNG
    assert np.allclose(model.modes.T @ model.modes, np.eye(len(model.variances)), atol=1e-6)
    again = QCThresholds.from_dict(QCThresholds(thresholds.bounds, shape=model).to_dict()).shape
    assert np.allclose(again.mean, model.mean, atol=1e-6) and np.allclose(again.modes, model.modes, atol=1e-6)
    assert np.allclose(again.variances, model.variances, rtol=1e-4)
    assert ShapeModel.from_dict({**model.to_dict(), "version": 0}) is None  # another version: re-fit, never misread


def test_implausible_shape_fires_on_a_lost_lower_lobe_within_the_false_alarm_budget(fitted):
    model, thresholds = fitted
    assert "shape_distance" in thresholds.bounds
    assert thresholds.false_alarm_val <= 0.05
    held_out = _masks(range(300, 330))
    clean = [flags(features(_prob(m), model), thresholds) for m in held_out]
    assert np.mean(["implausible_shape" in f for f in clean]) <= 0.10
    lost = [
        flags(features(_prob(_lose_lower_half_of_one_lung(m, i % 2)), model), thresholds)
        for i, m in enumerate(held_out)
    ]
    assert np.mean(["implausible_shape" in f for f in lost]) >= 0.8
    one_lung = held_out[0].copy()
    one_lung[:, SIZE // 2 :] = 0
    assert "implausible_shape" in flags(features(_prob(one_lung), model), thresholds)


@pytest.mark.parametrize("how", ["padded", "cropped", "downsampled"])
def test_shape_features_do_not_depend_on_framing(fitted, how):
    """Normalised by the lung pair's own position and size, not the image's: re-framed clean films
    are no more implausible than they were."""
    model, thresholds = fitted
    held_out = _masks(range(300, 330))
    shape_flags = [
        FEATURES["shape_distance"][1] in flags(features(_prob(_reframe(m, how)), model), thresholds) for m in held_out
    ]
    assert np.mean(shape_flags) <= 0.10


def test_features_without_a_shape_model_are_unchanged():
    prob = _prob(_masks([5])[0])
    plain = features(prob)
    assert not any(k.startswith("shape_") for k in plain)
    assert {
        k: v
        for k, v in features(prob, ShapeModel.fit([pair_landmarks(m) for m in _masks(range(10))])).items()
        if not k.startswith("shape_")
    } == plain


def test_completion_adds_the_lost_lobe_from_the_fit_and_only_outside_the_mask(fitted):
    """`shape.complete` on a mask whose lower half of one lung is gone: what it adds lies mostly in
    the lost lung, it never removes mask pixels, and it works at the original (here 4x) size."""
    from lungrt.inference.shape import complete

    model, _ = fitted
    gains = []
    for i, full in enumerate(_masks(range(300, 310))):
        lost = _lose_lower_half_of_one_lung(full, i % 2)
        big_full = cv2.resize(full, (4 * SIZE, 4 * SIZE), interpolation=cv2.INTER_NEAREST) > 0
        big_lost = cv2.resize(lost * 255, (4 * SIZE, 4 * SIZE), interpolation=cv2.INTER_NEAREST)
        completed, added = complete(big_lost, _prob(lost), model)
        assert added > 0 and np.all(completed[big_lost > 0] == 255)
        dice = [2 * (m & big_full).sum() / (m.sum() + big_full.sum()) for m in (big_lost > 0, completed > 0)]
        gains.append(dice[1] - dice[0])
        new = (completed > 0) & (big_lost == 0)
        assert (new & big_full).sum() / new.sum() > 0.5  # most of what is added is the lost lung
    assert np.mean(gains) > 0.03


def test_shape_model_travels_from_checkpoint_to_onnx(tiny_checkpoint, tmp_path):
    """The checkpoint's shape model (conftest: fitted on the phantoms' masks) is in the ONNX file's
    metadata, as runners and engine builds read it (the engine sidecar: tests/test_tensorrt_rtx.py)."""
    import json

    from lungrt.backends.base import onnx_metadata
    from lungrt.build.variants import make_variant
    from lungrt.models.checkpoint import load_checkpoint

    loaded = load_checkpoint(tiny_checkpoint)
    assert QCThresholds.from_dict(loaded.info.qc).shape is not None
    onnx = make_variant(loaded, "fp32", folder=tmp_path).path
    carried = json.loads(onnx_metadata(onnx)["lungrt.model"])["qc"]["shape_model"]
    assert carried == loaded.info.qc["shape_model"]
    assert QCThresholds.from_dict(json.loads(onnx_metadata(onnx)["lungrt.model"])["qc"]).shape.version == 1


def test_a_batch_is_fitted_as_each_of_its_masks_alone():
    """infer computes a batch's QC together (the shape fits share their array operations): each
    image's numbers equal its own, one-image computation, whatever its neighbours (a mask with one
    lung, no pair to fit, among them) and its film's proportions."""
    from lungrt.inference.qc import features_many

    model = ShapeModel.fit([pair_landmarks(m) for m in _masks(range(40))])
    masks = _masks(range(100, 106)) + [_lose_lower_half_of_one_lung(_masks([106])[0], 0)]
    masks[2][:, SIZE // 2 :] = 0  # one lung: no pair
    probs = [_prob(m) for m in masks]
    shapes = [(512, 512), (600, 480), (512, 512), (400, 640), None, (512, 512), (700, 500)]
    together = features_many(probs, model, shapes)
    for p, image_shape, feats in zip(probs, shapes, together):
        alone = features(p, model, image_shape)
        assert feats.keys() == alone.keys()
        assert all(feats[k] == pytest.approx(alone[k], rel=1e-9, abs=1e-12) for k in feats)
    assert together[2]["shape_distance"] == 99.0 and together[6]["shape_distance"] > together[0]["shape_distance"]
