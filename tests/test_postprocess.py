import numpy as np

from lungrt.postprocess import fill_holes, keep_two_largest_and_fill, lung_areas


def _two_lungs():
    m = np.zeros((60, 80), bool)
    m[10:50, 5:30] = True  # image-left block: patient's right lung (1000 px)
    m[10:40, 50:75] = True  # image-right block: patient's left lung (750 px)
    return m


def test_keeps_two_largest_and_fills_holes():
    m = _two_lungs()
    m[20:25, 10:15] = False  # a hole inside the right lung
    m[2:4, 40:42] = True  # a speck between the lungs
    m[55:58, 0:3] = True  # a speck at the border
    clean = keep_two_largest_and_fill(m)
    assert np.array_equal(clean, _two_lungs())


def test_border_touching_background_is_not_a_hole():
    m = np.zeros((20, 20), bool)
    m[:, 5:15] = True
    m[0:5, 8:12] = False  # notch open to the top border
    assert np.array_equal(fill_holes(m), m)


def test_lung_areas_by_side():
    assert lung_areas(_two_lungs()) == (1000, 750)
    assert lung_areas(np.zeros((10, 10), bool)) == (0, 0)
