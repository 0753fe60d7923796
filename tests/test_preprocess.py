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


@pytest.mark.parametrize(
    "dtype, shape, size", [(np.uint16, (2991, 2390), 256), (np.uint8, (2049, 1537), 256), (np.uint16, (1733, 2311), 64)]
)
def test_banded_area_downsize_is_opencvs_inter_area(dtype, shape, size):
    """Native-size images take the banded area resize: OpenCV's INTER_AREA weights in another
    summation order, so at most one unit apart, and only where the mean sits on a rounding half."""
    import cv2

    from lungrt.core.spec import area_downsize

    rng = np.random.default_rng(3)
    top = np.iinfo(dtype).max if dtype == np.uint8 else 4095
    img = np.clip(cv2.GaussianBlur(rng.uniform(0, top, shape).astype(np.float32), (0, 0), 4) * 3 - top, 0, top)
    img = (img + rng.normal(0, top / 300, shape)).clip(0, top).astype(dtype)
    ours = area_downsize(img, size)
    opencv = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    assert ours.dtype == dtype and ours.shape == (size, size)
    diff = np.abs(ours.astype(int) - opencv.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert np.array_equal(PreprocessSpec(size=size)._resize(img), ours)


def test_native_size_masks_are_unchanged_by_the_banded_resize():
    """What infer writes for a native-size 16-bit film: the same mask as with OpenCV's INTER_AREA
    everywhere, except where that pipeline's probability is within 1/255 of 0.5."""
    import cv2

    from lungrt.build.resolve import open_runner
    from lungrt.data.io import XRay
    from lungrt.data.phantoms import make_chest_phantom
    from lungrt.models.checkpoint import resolve_model

    films = []
    for seed, (h, w) in enumerate([(2400, 2000), (2991, 2390)]):
        unit = make_chest_phantom(seed, 512).image  # [0, 1] float
        raw = cv2.resize(unit * 4095, (w, h), interpolation=cv2.INTER_CUBIC)
        raw += np.random.default_rng(seed).normal(0, 12, raw.shape).astype(np.float32)
        films.append(XRay(f"film{seed}", np.clip(raw, 0, 4095).astype(np.uint16), bits=16, window=(0, 4095, False)))
    with open_runner(resolve_model("unet"), backend="torch", precision="fp32", log=lambda *a: None) as runner:
        spec = runner.spec
        opencv = np.stack(
            [
                spec.normalize(
                    spec.equalize8(
                        f.to_gray8(cv2.resize(f.image, (spec.size, spec.size), interpolation=cv2.INTER_AREA))
                    ).astype(np.float32)
                    / 255
                )[None]
                for f in films
            ]
        )
        banded = np.stack([spec.apply_xray(f) for f in films])
        before, after = runner.run(opencv)[:, 0], runner.run(banded)[:, 0]
    for f, p0, p1 in zip(films, before, after):
        m0, m1 = spec.invert_mask(p0, f.shape), spec.invert_mask(p1, f.shape)
        assert m0.any()
        differ = m0 != m1
        assert np.abs(spec.invert(p0, f.shape)[differ] - 0.5).max(initial=0) <= 1 / 255


def test_area_weights_are_each_rows_covered_fractions():
    """The banded resize's weight table, built for all rows at once, equals the definition row by
    row (first input index covered, covered fraction of each input index / scale), bit for bit."""
    from lungrt.core.spec import _area_weights

    for n_in, n_out in ((512, 256), (257, 256), (256, 256), (999, 333), (4021, 256), (2803, 224)):
        scale = n_in / n_out
        table = _area_weights.__wrapped__(n_in, n_out)
        assert len(table) == n_out
        for j, (first, weights) in enumerate(table):
            a, b = j * scale, (j + 1) * scale
            idx = np.arange(int(np.floor(a)), min(int(np.ceil(b)), n_in))
            assert first == idx[0]
            assert np.array_equal(weights, ((np.minimum(idx + 1, b) - np.maximum(idx, a)) / scale).astype(np.float32))


def test_mask_region_holds_every_lung_pixel_and_clean_up_there_is_the_same():
    """`lung_fields(..., within=mask_region)` looks for outlines in the box only: nothing of the
    mask may lie outside it, and the clean mask and areas equal the whole image's."""
    import cv2

    from lungrt.data.postprocess import lung_fields

    spec = PreprocessSpec(size=64)
    rng = np.random.default_rng(3)
    for _ in range(40):
        prob = cv2.GaussianBlur(rng.random((64, 64)).astype(np.float32), (0, 0), rng.uniform(0.7, 4))
        prob = np.clip((prob - prob.min()) / np.ptp(prob) * rng.uniform(0.4, 1.3), 0, 1).astype(np.float32)
        shape = (int(rng.integers(40, 700)), int(rng.integers(40, 700)))
        mask, (rows, cols) = spec.invert_mask(prob, shape), spec.mask_region(prob, shape)
        outside = mask.copy()
        outside[rows, cols] = 0
        assert not outside.any(), shape
        whole, boxed = lung_fields(mask), lung_fields(mask, within=(rows, cols))
        assert np.array_equal(whole.mask, boxed.mask)
        assert (whole.right_px, whole.left_px, whole.split_x) == (boxed.right_px, boxed.left_px, boxed.split_x)
    assert spec.mask_region(np.zeros((64, 64), np.float32), (300, 200)) == (slice(0, 0), slice(0, 0))


def test_area_downsize_in_bands_of_any_height_is_the_whole_images():
    from lungrt.core.spec import area_downsize, area_downsize_bands

    rng = np.random.default_rng(8)
    image = rng.integers(0, 4096, (1111, 733)).astype(np.uint16)
    whole = area_downsize(image, 64)
    for heights in ([1] * 1111, [5, 3, 1000, 103], [17] * 65 + [6], [1111]):
        cuts = np.cumsum([0] + heights)
        buffer = np.empty((max(heights), 733), np.uint16)  # one array reused for every band, as a reader does

        def bands():
            for a, b in zip(cuts, cuts[1:]):
                buffer[: b - a] = image[a:b]
                yield buffer[: b - a]

        assert np.array_equal(area_downsize_bands(bands(), 1111, 733, 64, np.uint16), whole), heights[:3]
    with pytest.raises(ValueError, match="not 1111"):
        area_downsize_bands([image[:1000]], 1111, 733, 64, np.uint16)
