"""The Python API: one LungSegmenter for checkpoints, ONNX files and engines; writes nothing into
the current folder; the README's example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import lungrt
from lungrt.core.errors import LungrtError
from lungrt.data.io import write_png
from lungrt.data.phantoms import make_phantom

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture()
def empty_cwd(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _image(path: Path, seed: int, h: int, w: int | None = None) -> Path:
    write_png(path, (make_phantom(seed, h, w).image * 255).astype(np.uint8))
    return path


def test_predict_path_array_list_and_folder(tmp_path, empty_cwd, tiny_checkpoint):
    seg = lungrt.LungSegmenter.load(tiny_checkpoint, backend="onnxruntime")
    one = seg.predict(_image(tmp_path / "a.png", 1, 90, 70))
    assert isinstance(one, lungrt.LungResult)
    assert one.mask.shape == (90, 70) and one.mask.dtype == bool and one.probability.shape == (90, 70)
    assert one.right_lung_px + one.left_lung_px == one.mask.sum() > 0
    arr = (make_phantom(2, 80).image * 4095).astype(np.uint16)
    assert seg.predict(arr).mask.shape == (80, 80)
    many = seg.predict([tmp_path / "a.png", arr, make_phantom(3, 64).image.astype(np.float32)])
    assert [r.mask.shape for r in many] == [(90, 70), (80, 80), (64, 64)]
    _image(tmp_path / "dir" / "b.png", 4, 50)
    folder = seg.predict(tmp_path / "dir")
    assert len(folder) == 1 and folder[0].path.endswith("b.png")
    assert not list(empty_cwd.iterdir())  # nothing written into the current folder


def test_same_masks_from_checkpoint_and_its_onnx(tmp_path, empty_cwd, tiny_checkpoint):
    img = _image(tmp_path / "a.png", 5, 96)
    torch_seg = lungrt.LungSegmenter.load(tiny_checkpoint, backend="torch")
    onnx_path = torch_seg.export("onnx", precision="fp32", out=tmp_path / "variants")
    assert onnx_path.parent == tmp_path / "variants" and onnx_path.suffix == ".onnx"
    ort_seg = lungrt.LungSegmenter.load(onnx_path)
    assert "onnxruntime" in repr(ort_seg)
    a, b = torch_seg.predict(img), ort_seg.predict(img)
    assert (a.mask != b.mask).mean() < 1e-3
    paths = a.save(tmp_path / "saved")
    assert paths["mask"].is_file() and paths["overlay"].is_file()
    assert not list(empty_cwd.iterdir())


def test_engine_export_and_load(tmp_path, empty_cwd, tiny_checkpoint):
    seg = lungrt.LungSegmenter.load(tiny_checkpoint)
    plan = seg.export("engine", precision="fp16", backend="tensorrt-rtx", out=tmp_path / "eng")
    assert plan.suffix == ".plan" and plan.stat().st_size > 0
    from lungrt.backends.tensorrt import gpu_environment

    if gpu_environment() is None:
        with pytest.raises(LungrtError, match="needs an NVIDIA GPU"):
            lungrt.LungSegmenter.load(plan)
    else:
        assert lungrt.LungSegmenter.load(plan).predict(_image(tmp_path / "a.png", 1, 64)).mask.shape == (64, 64)
    assert not list(empty_cwd.iterdir())


def test_bad_inputs_are_clear_errors(tiny_checkpoint):
    seg = lungrt.LungSegmenter.load(tiny_checkpoint, backend="torch")
    with pytest.raises(LungrtError, match="2-D"):
        seg.predict(np.zeros((3, 40, 40)))
    with pytest.raises(LungrtError, match="cannot read"):
        seg.predict(42)


def test_readme_python_example_runs(tmp_path, empty_cwd):
    text = README.read_text()
    section = text[text.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    assert namespace["result"].mask.shape == (512, 512)
    assert not list(empty_cwd.iterdir())


@pytest.mark.parametrize(
    "array, reason",
    [
        (np.zeros((0, 0), np.uint8), "too small"),
        (np.zeros((0, 5), np.uint16), "too small"),
        (np.zeros((1, 1), np.float32), "too small"),
        (np.zeros((4, 4), np.uint8), "too small"),
        (np.zeros((64, 64), bool), "looks like a mask"),
        (np.zeros((64, 64), np.complex64), "not a gray image"),
        (np.array([[object()] * 20] * 20), "not a gray image"),
        (np.zeros((64, 64, 3), np.uint8), "must be 2-D"),
    ],
)
def test_predict_refuses_what_the_cli_refuses_in_one_line(tiny_checkpoint, array, reason):
    seg = lungrt.LungSegmenter.load(str(tiny_checkpoint), backend="torch")
    with pytest.raises(LungrtError, match=reason) as e:
        seg.predict(array)
    assert "\n" not in str(e.value)
    with pytest.raises(LungrtError, match="nested lists"):
        seg.predict([[[0] * 20] * 20])


def test_predict_streams_any_iterable_in_input_order(tiny_checkpoint):
    seg = lungrt.LungSegmenter.load(str(tiny_checkpoint), backend="torch")
    arrays = [(make_phantom(60 + i, 96 + 8 * i).image * 255).astype(np.uint8) for i in range(7)]
    listed = seg.predict(arrays, batch_size=3)
    streamed = seg.predict((a for a in arrays), batch_size=3, stream=True)  # a generator in, a generator out
    assert not isinstance(streamed, list)
    got = list(streamed)
    assert len(got) == 7 and [r.shape for r in got] == [a.shape for a in arrays]
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(listed, got))


def test_the_full_size_probability_is_made_only_when_read(tiny_checkpoint, monkeypatch):
    from lungrt.core.spec import PreprocessSpec

    calls = []
    invert = PreprocessSpec.invert
    monkeypatch.setattr(PreprocessSpec, "invert", lambda self, *a, **k: calls.append(1) or invert(self, *a, **k))
    seg = lungrt.LungSegmenter.load(str(tiny_checkpoint), backend="torch")
    r = seg.predict((make_phantom(3, 300, 260).image * 255).astype(np.uint8))
    assert calls == []
    p = r.probability
    assert calls == [1] and p.shape == (300, 260) and p.dtype == np.float32 and 0 <= p.min() <= p.max() <= 1


def test_streaming_memory_stays_flat_with_the_number_of_inputs(tiny_checkpoint):
    """Python-side peak memory (tracemalloc: numpy's buffers included) through predict(stream=True)
    over 2-megapixel 16-bit images does not grow with the number of inputs (only a window is held)."""
    import tracemalloc

    seg = lungrt.LungSegmenter.load(str(tiny_checkpoint), backend="torch")
    image = (make_phantom(5, 1400, 1400).image * 4000).astype(np.uint16)

    def peak(n: int) -> int:
        tracemalloc.start()
        try:
            areas = [r.right_lung_px for r in seg.predict((image.copy() for _ in range(n)), batch_size=2, stream=True)]
            assert len(areas) == n
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(2)  # warm-up: caches and the window table
    small, large = peak(8), peak(32)
    # holding every input would add at least 24 more images (94 MB); thread timing moves the peak
    # by a few images of the read-ahead window either way
    assert large - small < 0.5 * (32 - 8) * image.nbytes, (small, large)


def test_one_unreadable_file_in_a_folder_loses_no_result(tmp_path, tiny_checkpoint):
    from lungrt.api import PredictErrors

    for i in range(3):
        write_png(tmp_path / f"good{i}.png", (make_phantom(70 + i, 96).image * 255).astype(np.uint8))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    seg = lungrt.LungSegmenter.load(str(tiny_checkpoint), backend="torch")
    results = seg.predict(tmp_path, batch_size=2)
    assert [Path(r.path).name for r in results] == ["bad.png", "good0.png", "good1.png", "good2.png"]
    assert not results[0].ok and results[0].status == "error" and results[0].mask.size == 0
    assert results[0].error == "corrupt or truncated image (Truncated File Read)"  # infer's row says the same
    assert all(r.ok and r.mask.shape == (96, 96) for r in results[1:])
    handed = []
    with pytest.raises(PredictErrors) as e:
        for r in seg.predict(tmp_path, batch_size=2, stream=True, errors="raise"):
            handed.append(r)
    assert len(handed) == 3 and len(e.value.results) == 4 and len(e.value.errors) == 1


def test_a_failing_source_still_hands_over_what_came_before(tiny_checkpoint):
    seg = lungrt.LungSegmenter.load(str(tiny_checkpoint), backend="torch")

    def films():
        for i in range(4):
            yield (make_phantom(80 + i, 96).image * 255).astype(np.uint8)
        raise ConnectionError("the PACS went away at item 5")

    got = []
    with pytest.raises(ConnectionError, match="item 5"):
        for r in seg.predict(films(), batch_size=3, stream=True):
            got.append(r)
    assert len(got) == 4 and all(r.ok for r in got)
    with pytest.raises(ConnectionError) as e:
        seg.predict(films(), batch_size=3)
    assert len(e.value.results) == 4


def test_api_and_infer_give_the_same_masks_and_rows(tmp_path, tiny_checkpoint):
    """One stream behind both front doors: the same batch shape, masks, measurements and rows, with a
    corrupt PNG, an empty file and a DICOM that holds no radiograph (pydicom's RT structure set) among them."""
    import csv
    import shutil

    from pydicom.data import get_testdata_file
    from PIL import Image

    d = tmp_path / "in"
    for i in range(5):
        write_png(d / f"f{i}.png", (make_phantom(90 + i, 96 + 16 * (i % 2), 112).image * 255).astype(np.uint8))
    (d / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (d / "empty.png").write_bytes(b"")
    shutil.copy(get_testdata_file("rtstruct.dcm"), d / "rtstruct.dcm")
    seg = lungrt.LungSegmenter.load(str(tiny_checkpoint), backend="torch")
    results = seg.predict(d, batch_size=3)
    summary = seg.infer([d], tmp_path / "out", batch_size=3)
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert summary["ok"] == 5 and summary["failed"] == 2 and summary["not_radiographs"] == 1
    assert [Path(r.path).name for r in results] == [Path(row["path"]).name for row in rows]
    assert [r.status for r in results].count("skipped") == 1
    for r, row in zip(results, rows):
        assert (r.status, r.error, r.note) == (row["status"], row["error"], row["note"]), row["path"]
        if r.ok:
            on_disk = np.asarray(Image.open(tmp_path / "out" / row["mask"]).convert("L")) > 0
            assert np.array_equal(r.mask, on_disk), row["path"]
            assert (r.right_lung_px, r.left_lung_px, r.qc) == (
                int(row["right_lung_px"]),
                int(row["left_lung_px"]),
                row["qc"],
            )
