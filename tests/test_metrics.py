import math

import numpy as np
import pytest

from lungrt.evaluation.metrics import behind_heart, hd95, mean_metrics, segmentation_metrics


def test_hand_computed_case():
    gold = np.zeros((4, 5), bool)
    gold[0, :4] = True  # 4 lung pixels
    pred = np.zeros((4, 5), bool)
    pred[0, 2:5] = True  # 3 predicted: tp=2, fp=1, fn=2, tn=15
    m = segmentation_metrics(pred, gold)
    assert m["accuracy"] == pytest.approx(17 / 20)
    assert m["iou"] == pytest.approx(2 / 5)
    assert m["dice"] == pytest.approx(4 / 7)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert m["miou"] == pytest.approx((2 / 5 + 15 / 18) / 2)


def test_perfect_and_empty_masks():
    gold = np.zeros((10, 10), bool)
    gold[2:5, 2:5] = True
    m = segmentation_metrics(gold, gold)
    assert all(m[k] == 1.0 for k in ("accuracy", "iou", "miou", "dice", "f1", "precision", "recall"))
    assert m["hd95"] == 0.0
    empty = np.zeros_like(gold)
    both_empty = segmentation_metrics(empty, empty)
    assert both_empty["dice"] == 1.0 and both_empty["iou"] == 1.0 and both_empty["hd95"] == 0.0
    missed = segmentation_metrics(empty, gold)
    assert missed["dice"] == 0.0 and missed["recall"] == 0.0 and missed["precision"] == 1.0
    assert math.isnan(missed["hd95"])


def test_hd95_shift_in_pixels_and_mm():
    gold = np.zeros((40, 40), bool)
    gold[10:30, 10:30] = True
    pred = np.roll(gold, 3, axis=1)  # shifted 3 columns
    assert hd95(pred, gold) == pytest.approx(3.0)
    assert hd95(pred, gold, spacing=(0.5, 0.2)) == pytest.approx(0.6)


def test_means_skip_undefined_hd95():
    gold = np.zeros((8, 8), bool)
    gold[2:6, 2:6] = True
    rows = [segmentation_metrics(gold, gold), segmentation_metrics(np.zeros_like(gold), gold)]
    m = mean_metrics(rows)
    assert m["dice"] == pytest.approx(0.5) and m["hd95"] == 0.0 and m["hd95_undefined"] == 1


def _two_lungs() -> np.ndarray:
    """Two rectangular 'lungs' on a 100 x 100 PA image: the patient's left lung is the image's right."""
    gold = np.zeros((100, 100), bool)
    gold[10:90, 10:40] = True
    gold[10:90, 60:90] = True
    return gold


def test_behind_heart_counts_only_the_lower_medial_quarter_of_the_left_lung():
    gold = _two_lungs()
    pred = gold.copy()
    pred[60:90, 60:70] = False  # the lung behind the heart left out: lower medial part of the left lung
    b = behind_heart(pred, gold)
    assert b["behind_heart_missed"] == pytest.approx(300 / gold.sum())
    assert b["behind_heart_added"] == 0.0
    lateral = gold.copy()
    lateral[60:90, 80:90] = False  # the same amount missed laterally, or in the other lung, is not counted
    lateral[60:90, 10:20] = False
    assert behind_heart(lateral, gold) == {"behind_heart_missed": 0.0, "behind_heart_added": 0.0}
    wider = gold.copy()
    wider[55:90, 50:60] = True  # the heart's shadow taken into the mask
    assert behind_heart(wider, gold)["behind_heart_added"] == pytest.approx(350 / gold.sum())


def test_evaluation_splits_its_means_by_the_behind_heart_disagreement():
    from lungrt.evaluation.evaluate import behind_heart_line, by_behind_heart

    gold = _two_lungs()
    pred = gold.copy()
    pred[50:90, 60:75] = False
    rows = [
        {"name": "a", **segmentation_metrics(gold, gold), **behind_heart(gold, gold)},
        {"name": "b", **segmentation_metrics(pred, gold), **behind_heart(pred, gold)},
    ]
    split = by_behind_heart(rows)
    assert split["differ"]["images"] == 1 and split["rest"]["images"] == 1
    assert split["rest"]["dice"] == 1.0 and split["differ"]["dice"] < 0.95
    assert "1 images where gold and prediction differ" in behind_heart_line(rows)
    assert "agree" in behind_heart_line(rows[:1])
