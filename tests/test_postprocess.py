import cv2
import numpy as np
import pytest

from lungrt.data.postprocess import lung_fields


def _two_lungs():
    m = np.zeros((60, 80), bool)
    m[10:50, 5:30] = True  # image-left block: patient's right lung (1000 px)
    m[10:40, 50:75] = True  # image-right block: patient's left lung (750 px)
    return m


def test_keeps_two_largest_and_fills_holes():
    m = _two_lungs()
    m[20:25, 10:15] = False  # a hole inside the right lung
    m[30:33, 60:62] = False  # a hole inside the left lung
    m[2:4, 40:42] = True  # a speck between the lungs
    m[55:58, 0:3] = True  # a speck at the border
    lungs = lung_fields(m)
    assert lungs.mask.dtype == np.uint8 and set(np.unique(lungs.mask)) == {0, 255}
    assert np.array_equal(lungs.mask > 0, _two_lungs())
    assert (lungs.right_px, lungs.left_px) == (1000, 750)  # measured after clean-up


def test_island_inside_a_hole_is_filled_not_counted_apart():
    m = np.zeros((40, 40), bool)
    m[5:35, 5:35] = True
    m[10:30, 10:30] = False  # large hole
    m[18:22, 18:22] = True  # island inside it
    lungs = lung_fields(m)
    assert (lungs.mask > 0).sum() == 900 and lungs.area_px == 900


def test_border_touching_background_is_not_a_hole():
    m = np.zeros((20, 20), bool)
    m[:, 5:15] = True
    m[0:5, 8:12] = False  # notch open to the top border
    assert np.array_equal(lung_fields(m).mask > 0, m)


def test_without_clean_up_every_component_is_measured_as_is():
    m = _two_lungs()
    m[20:25, 10:15] = False
    m[2:4, 70:72] = True  # a speck on the image's right
    lungs = lung_fields(m, clean=False)
    assert np.array_equal(lungs.mask > 0, m)
    assert (lungs.right_px, lungs.left_px) == (1000 - 25, 750 + 4)


def test_empty_and_full_masks():
    empty = lung_fields(np.zeros((10, 10), bool))
    assert (empty.right_px, empty.left_px) == (0, 0) and not empty.mask.any()
    full = lung_fields(np.ones((10, 12), bool))
    assert full.area_px == 120 and full.mask.all()


def test_qc_features_equal_the_definitions_over_every_lung_pixel():
    """QC summarises the mask by row/column counts for speed; the numbers must equal the plain
    definitions (percentiles and means over np.nonzero's coordinates)."""
    import cv2

    from lungrt.inference.qc import features

    rng = np.random.default_rng(0)
    for i in range(60):
        p = cv2.GaussianBlur(rng.random((64, 80)).astype(np.float32), (0, 0), rng.uniform(0.5, 6))
        p = ((p - p.min()) / (p.max() - p.min() + 1e-6)) ** rng.uniform(0.2, 8)
        if i % 7 == 0:  # a single lung pixel
            p = np.zeros_like(p)
        p[rng.integers(0, 64), rng.integers(0, 80)] = 0.9
        m = p > 0.5
        ys, xs = np.nonzero(m)
        f = features(p)
        width, height = np.percentile(xs, 99) - np.percentile(xs, 1), np.percentile(ys, 99) - np.percentile(ys, 1)
        assert f["aspect"] == pytest.approx((height + 1) / (width + 1), abs=1e-9)
        assert f["box_fill"] == pytest.approx(m.sum() / ((width + 1) * (height + 1)), abs=1e-9)
        assert f["centroid_x"] == pytest.approx(xs.mean() / 80, abs=1e-9)
        assert f["centroid_y"] == pytest.approx(ys.mean() / 64, abs=1e-9)
        assert f["confidence"] == pytest.approx(p[m].mean(), abs=1e-6)
        assert f["uncertain_fraction"] == pytest.approx(np.count_nonzero((p > 0.1) & (p < 0.9)) / m.sum())
        inner = m.copy()
        inner[[0, 1, -2, -1], :] = inner[:, [0, 1, -2, -1]] = False
        assert f["border_fraction"] == pytest.approx((m.sum() - inner.sum()) / m.sum())


def test_touching_lungs_are_split_at_the_mediastinum():
    """Two lungs that meet (severe ARDS): one component across the midline. Each side gets its own
    area (it used to give one side 0), split where the mask is narrowest between them."""
    from lungrt.data.postprocess import side_labels

    m = np.zeros((200, 220), np.uint8)
    cv2.ellipse(m, (70, 100), (45, 75), 0, 0, 360, 255, -1)  # the patient's right lung (image left), larger
    cv2.ellipse(m, (150, 100), (35, 70), 0, 0, 360, 255, -1)
    cv2.rectangle(m, (110, 80), (120, 95), 255, -1)  # where they touch
    assert cv2.connectedComponents(m)[0] == 2  # background + one component
    for clean in (True, False):
        f = lung_fields(m, clean=clean)
        assert 105 <= f.split_x <= 125 and f.right_px > f.left_px > 0
        assert f.right_px + f.left_px == int((m > 0).sum())
        labels = side_labels(f)
        assert int((labels == 1).sum()) == f.right_px and int((labels == 2).sum()) == f.left_px
    one = np.zeros((200, 220), np.uint8)
    cv2.ellipse(one, (70, 100), (45, 75), 0, 0, 360, 255, -1)  # one lung only (the other opaque): no split
    f = lung_fields(one)
    assert f.split_x is None and f.left_px == 0 and f.right_px > 0


def test_phantom_lungs_grown_together_keep_both_sides():
    from lungrt.data.phantoms import make_phantom

    for seed in range(4):
        separate = lung_fields((make_phantom(seed, 256).mask > 0).astype(np.uint8) * 255)
        truth = separate.mask  # the two lungs
        cols = np.flatnonzero(separate.mask.any(axis=0))
        gap = cols[np.flatnonzero(np.diff(cols) > 1)[0] : np.flatnonzero(np.diff(cols) > 1)[0] + 2]
        merged = truth.copy()  # opacified lung joins them across the mediastinum: a band 12 rows high
        rows = np.flatnonzero(truth[:, : gap[0] + 1].any(axis=1) & truth[:, gap[1] :].any(axis=1))  # both lungs
        mid = int(np.median(rows))
        in_row = np.flatnonzero(truth[mid])
        merged[mid - 6 : mid + 6, in_row[0] : in_row[-1] + 1] = 255
        assert cv2.connectedComponents(merged)[0] == 2, seed
        f = lung_fields(merged)
        assert f.right_px > 0 and f.left_px > 0, seed
        assert gap[0] <= f.split_x <= gap[1] + 1, (seed, gap, f.split_x)  # in the gap the lungs had before
