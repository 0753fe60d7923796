import numpy as np
import pytest

from lungrt.core.spec import PreprocessSpec


def test_spec_round_trips_through_json():
    spec = PreprocessSpec(size=192, equalization="clahe", clahe_clip=3.0, mean=0.4, std=0.3)
    assert PreprocessSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("bad", [dict(size=100), dict(equalization="gamma"), dict(std=0)])
def test_spec_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        PreprocessSpec(**bad)


@pytest.mark.parametrize("eq", ["none", "histogram", "clahe"])
def test_apply_gives_normalised_square_input(eq):
    rng = np.random.default_rng(0)
    img = rng.uniform(0.2, 0.4, (300, 220)).astype(np.float32)  # low-contrast, non-square
    spec = PreprocessSpec(size=64, equalization=eq)
    x = spec.apply(img)
    assert x.shape == (1, 64, 64) and x.dtype == np.float32
    unit = x * spec.std + spec.mean
    assert unit.min() >= -1e-6 and unit.max() <= 1 + 1e-6
    if eq == "histogram":  # equalisation spreads the narrow input range over [0, 1]
        assert unit.max() - unit.min() > 0.9
    if eq == "none":
        assert 0.15 < unit.mean() < 0.45


def test_invert_maps_back_to_original_shape():
    spec = PreprocessSpec(size=64)
    prob = np.zeros((64, 64), np.float32)
    prob[:, :32] = 1.0  # left half
    back = spec.invert_mask(prob, (300, 220))
    assert back.shape == (300, 220)
    assert back[:, :100].all() and not back[:, 120:].any()


def test_mask_from_8bit_interpolation_matches_the_float_probabilities():
    # infer, eval and parity threshold the probabilities interpolated in 8 bits: the verdict may
    # differ from the float map only where that map is within 1/255 of 0.5
    spec = PreprocessSpec(size=64)
    prob = np.random.default_rng(0).uniform(0, 1, (64, 64)).astype(np.float32)
    for shape in [(300, 220), (2900, 2100), (50, 40)]:
        mask = spec.invert_mask(prob, shape)
        full = spec.invert(prob, shape)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        differ = (mask > 0) != (full >= 0.5)
        assert np.abs(full[differ] - 0.5).max(initial=0) <= 1 / 255
        assert differ.mean() < 0.01


def test_apply_is_deterministic_and_batchable():
    spec = PreprocessSpec(size=32)
    ims = [np.random.default_rng(i).uniform(0, 1, (50, 40)).astype(np.float32) for i in range(3)]
    b = spec.apply_batch(ims)
    assert b.shape == (3, 1, 32, 32)
    assert np.array_equal(b[1], spec.apply(ims[1]))


def test_xrays_are_preprocessed_from_their_raw_pixels_the_same_way_everywhere(tmp_path):
    """8-bit X-rays: apply_xray is exactly apply(gray8). 16-bit ones are resized on raw values and
    windowed after: the same area average, rounded once (at most one grey level apart)."""
    import cv2

    from lungrt.core.spec import PreprocessSpec
    from lungrt.data.io import read_xray

    spec = PreprocessSpec(size=64)
    rng = np.random.default_rng(5)
    base = cv2.GaussianBlur(rng.normal(2000, 600, (700, 530)), (0, 0), 9)
    raw16 = np.clip(base + rng.normal(0, 20, base.shape), 0, 4095).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), raw16)
    cv2.imwrite(str(tmp_path / "flat.png"), (raw16 // 16).astype(np.uint8))
    flat, deep = read_xray(tmp_path / "flat.png"), read_xray(tmp_path / "deep.png")
    assert np.array_equal(spec.apply_xray(flat), spec.apply(flat.gray8))
    assert deep.window is not None
    diff = np.abs(spec.resize_xray8(deep).astype(int) - spec.resize8(deep.gray8).astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.5
