"""QC thresholds: fitted per feature on training predictions, checked on validation."""

import numpy as np
import pytest

from lungrt.inference.qc import (
    FEATURES,
    MARGINS,
    QCThresholds,
    _bounds_at,
    component_sizes,
    fit_thresholds,
    flagged_share,
    flags,
)


def _normal(rng: np.random.Generator, n: int) -> list[dict[str, float]]:
    """Feature rows like a model's predictions on normal X-rays (a lung never touches the border)."""
    base = {
        "box_fill": 0.6,
        "lr_balance": 0.8,
        "components": 2.0,
        "uncertain_fraction": 0.1,
        "confidence": 0.97,
        "border_fraction": 0.0,
        "centroid_x": 0.5,
        "centroid_y": 0.45,
        "aspect": 0.85,
        "base_width": 0.47,
    }
    rows = []
    for _ in range(n):
        row = {
            k: v + (rng.normal(0, 0.02) if k not in ("components", "border_fraction") else 0.0) for k, v in base.items()
        }
        row["base_width"] = 0.47 - rng.normal(0, 0.04)
        rows.append(row)
    shape_rng = np.random.default_rng(n)  # the shape model's numbers, drawn apart (the other draws stay as they were)
    for row in rows:
        row["shape_dice"] = 0.975 - abs(shape_rng.normal(0, 0.006))
        row["shape_distance"] = 3.5 + abs(shape_rng.normal(0, 1.0))
    return rows


def test_a_flag_no_margin_can_quieten_does_not_widen_the_other_bounds():
    """Four of 100 validation images touch the border (zero spread in training: no margin helps);
    two have a somewhat wide lung field. The old single shared margin had to widen every bound
    until the rest fit into the 1% left; per feature, only aspect widens and base_width stays at the
    training extreme, so a lung field as wide at its base as anywhere (upside down: 0.85) is still flagged."""
    rng = np.random.default_rng(0)
    train, val = _normal(rng, 300), _normal(rng, 100)
    for row in val[:4]:
        row["border_fraction"] = 0.05
    for row in val[4:6]:
        row["aspect"] = 0.93
    fitted = fit_thresholds(train, val, target=0.05)

    assert fitted.false_alarm_val <= 0.05
    assert fitted.margin["base_width"] == 0.0 and fitted.margin["border_fraction"] == 0.0
    assert fitted.margin["aspect"] > 0.0
    upside_down = {**train[0], "base_width": 0.85}
    assert "wide_base" in flags(upside_down, fitted)


def test_fit_stops_when_no_widening_clears_a_false_alarm():
    rng = np.random.default_rng(1)
    train, val = _normal(rng, 200), _normal(rng, 50)
    for row in val[:5]:
        row["border_fraction"] = 0.2  # 10% of validation, beyond any margin
    fitted = fit_thresholds(train, val, target=0.05)
    assert fitted.false_alarm_val == flagged_share(val, fitted) == 0.1
    measured = set(FEATURES) - {"whole_lung_cover"}  # the second opinion's: only when a reference ran
    assert set(fitted.margin) == measured and set(fitted.margin.values()) <= set(MARGINS)


def test_every_framing_stays_within_the_budget_not_only_all_pooled():
    """One framing (a tighter crop) makes 8 of 100 images look squat; pooled with three framings that
    look normal it is 2%, within 5%, but that framing alone is not: its bound widens until it is."""
    rng = np.random.default_rng(3)
    train = _normal(rng, 300)
    groups = {name: _normal(rng, 100) for name in ("as it comes", "padded", "downsampled", "cropped")}
    for row in groups["cropped"][:8]:
        row["aspect"] = 0.95
    pooled = fit_thresholds(train, [row for rows in groups.values() for row in rows], target=0.05)
    assert flagged_share(groups["cropped"], pooled) > 0.05  # what fitting on the pool alone allowed
    each = fit_thresholds(train, groups, target=0.05)
    assert all(flagged_share(rows, each) <= 0.05 for rows in groups.values())
    assert each.false_alarm_val == max(flagged_share(rows, each) for rows in groups.values())
    assert each.margin["aspect"] > pooled.margin["aspect"]


def test_thresholds_round_trip_through_metadata():
    rng = np.random.default_rng(2)
    fitted = fit_thresholds(_normal(rng, 100), _normal(rng, 40), description="test fit")
    again = QCThresholds.from_dict(fitted.to_dict())
    assert again == fitted


def test_images_flagged_by_two_features_widen_both():
    """Validation images off-centre and unbalanced at once: widening either bound alone clears none,
    so both widen together until they pass."""
    rng = np.random.default_rng(3)
    train, val = _normal(rng, 300), _normal(rng, 100)
    for row in val[:8]:
        row["centroid_x"], row["lr_balance"], row["centroid_y"] = 0.58, 0.7, 0.45  # off to one side only
    fitted = fit_thresholds(train, val, target=0.05)
    assert fitted.false_alarm_val <= 0.05
    assert fitted.margin["centroid_x"] > 0 and fitted.margin["lr_balance"] > 0
    assert not {"unbalanced", "off_centre"} & {reason for row in val[:8] for reason in flags(row, fitted)}


def test_no_margin_is_wider_than_validation_needs():
    """The greedy widening overshoots (seed 1 ended at 4% of validation with five margins each a
    step wider than needed): after the fit, narrowing any margin one step flags more than the target,
    so bounds such as upside down stay as tight as the false-alarm budget allows."""
    for seed in (1, 11, 39):
        rng = np.random.default_rng(seed)
        train, val = _normal(rng, 300), _normal(rng, 100)
        for row in val[: rng.integers(3, 9)]:
            name = rng.choice(["centroid_x", "centroid_y", "lr_balance", "aspect", "confidence", "box_fill"])
            row[name] += (
                -rng.uniform(0.02, 0.1) if name == "confidence" else rng.choice([-1, 1]) * rng.uniform(0.03, 0.12)
            )
            if rng.random() < 0.5:
                other = rng.choice(["centroid_y", "base_width", "aspect"])
                row[other] += rng.choice([-1, 1]) * rng.uniform(0.03, 0.1)
        fitted = fit_thresholds(train, val, target=0.05)
        assert fitted.false_alarm_val <= 0.05
        for name, margin in fitted.margin.items():
            if margin:
                narrower = {**fitted.margin, name: MARGINS[MARGINS.index(margin) - 1]}
                assert flagged_share(val, QCThresholds(_bounds_at(train, narrower), "", None, narrower)) > 0.05, (
                    seed,
                    name,
                )


def test_base_width_measures_how_wide_the_lowest_tenth_of_the_lung_field_is():
    """Real lung fields end below in narrow costophrenic tips, the base rising medially over the
    diaphragm dome (the lowest tenth is about half as wide as the widest row); on an upside-down
    X-ray the networks draw a box reaching the full width of the upper chest at the bottom (what
    benchmarks/qc_corruptions.py shows for the ones no other feature flags)."""
    import cv2

    from lungrt.inference.qc import features

    upright = np.zeros((200, 200), np.float32)
    boxy = np.zeros_like(upright)
    for side in (-1, 1):
        x0 = 100 + side * 15
        outline = [
            (x0, 40),
            (x0 + side * 8, 24),
            (x0 + side * 30, 18),
            (x0 + side * 52, 32),
            (x0 + side * 70, 150),
            (x0 + side * 72, 180),
            (x0 + side * 45, 140),
            (x0, 130),
        ]
        cv2.fillPoly(upright, [np.array(outline, np.int32)], 1.0)
        cv2.rectangle(boxy, (x0, 30), (x0 + side * 65, 175), 1.0, -1)
    assert features(upright)["base_width"] < 0.3
    assert features(boxy)["base_width"] == 1.0
    rng = np.random.default_rng(4)
    fitted = fit_thresholds(_normal(rng, 300), _normal(rng, 100))
    assert flags({**_normal(rng, 1)[0], "base_width": features(boxy)["base_width"]}, fitted) == ["wide_base"]


def test_thresholds_from_an_older_lungrt_say_which_bounds_are_not_checked(caplog, monkeypatch):
    """An engine or ONNX file exported before taper was replaced still carries a taper bound: it is
    not checked, and the log says so instead of silently dropping the upside-down check."""
    import lungrt.inference.qc as qc

    monkeypatch.setattr(qc, "_WARNED", set())  # what earlier tests in this process warned about
    old = {"bounds": {"lung_fraction": [0.1, 0.4], "taper": [0.51, None]}, "fitted_on": "an older release"}
    with caplog.at_level("WARNING", logger="lungrt.inference.qc"):
        thresholds = QCThresholds.from_dict(old)
        QCThresholds.from_dict(old)  # infer reads the thresholds per image: one warning is enough
    assert caplog.text.count("taper") == 1 and "re-fit" in caplog.text
    assert flags({"lung_fraction": 0.3, "taper": 0.1}, thresholds) == []


def test_component_sizes_are_each_8_connected_components_pixel_count():
    import cv2

    rng = np.random.default_rng(3)
    for shape in ((256, 256), (97, 131), (600, 600)):  # 600 px: more components than 16-bit labels hold
        mask = (rng.random(shape) < 0.3).astype(np.uint8)
        n, labels = cv2.connectedComponents(mask, connectivity=8)
        assert component_sizes(mask).tolist() == np.bincount(labels.ravel(), minlength=n)[1:].tolist()
    two = np.zeros((64, 64), np.uint8)
    two[5:20, 5:25], two[30:60, 40:41] = 1, 1
    assert sorted(component_sizes(two).tolist()) == [30, 300]


def test_sizes_are_measured_against_the_lung_field_not_the_image():
    """The same pair of lung fields with a speck beside it, framed loosely, tightly and at another
    resolution: fill, aspect and fragments stay (the image-relative lung fraction and extents they
    replace moved by 2-3x and flagged tightly framed clean films); where the field sits does move."""
    import cv2

    from lungrt.inference.qc import features

    film = np.zeros((400, 400), np.float32)
    cv2.ellipse(film, (140, 200), (55, 120), 0, 0, 360, 1.0, -1)
    cv2.ellipse(film, (265, 205), (50, 110), 0, 0, 360, 1.0, -1)
    cv2.circle(film, (205, 330), 14, 1.0, -1)  # a fragment: ~1.5 % of the mask
    framings = {
        "as drawn": film,
        "tight": film[60:355, 75:325],
        "padded": np.pad(film, 150),
        "padded below": np.pad(film, ((0, 200), (0, 0))),
        "smaller": cv2.resize(film, (240, 240), interpolation=cv2.INTER_AREA),
    }
    feats = {
        name: features(cv2.resize(f, (256, 256), interpolation=cv2.INTER_LINEAR), image_shape=f.shape)
        for name, f in framings.items()
    }  # the network sees every framing squeezed to its square
    for name, f in feats.items():
        assert f["box_fill"] == pytest.approx(feats["as drawn"]["box_fill"], rel=0.03), name
        assert f["aspect"] == pytest.approx(feats["as drawn"]["aspect"], rel=0.03), name
        assert f["components"] == 3, name
    assert feats["padded below"]["centroid_y"] < feats["as drawn"]["centroid_y"] - 0.1


def test_a_spread_floor_lets_a_zero_spread_flag_widen_only_as_far_as_validation_needs():
    """border_fraction is zero on every training image: no margin widens it (above). With a floor under its spread
    (`min_spread`, benchmarks/qc_border_floor.py) it widens until the slightly touching validation films pass,
    and a film with a tenth of its mask at the border is still flagged."""
    rng = np.random.default_rng(2)
    train, val = _normal(rng, 200), _normal(rng, 50)
    for row in val[:5]:
        row["border_fraction"] = 0.004
    assert fit_thresholds(train, val, target=0.05).false_alarm_val == 0.1
    fitted = fit_thresholds(train, val, target=0.05, min_spread={"border_fraction": 0.005})
    assert fitted.false_alarm_val <= 0.05 and 0.004 < fitted.bounds["border_fraction"][1] <= 0.01
    assert "at_border" in flags({**val[10], "border_fraction": 0.1}, fitted)
