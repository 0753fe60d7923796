"""`lungrt infer` never loses, mixes up or deletes data, and every failure is one clear line
(issue 13). Each test here failed before its fix."""

from __future__ import annotations

import csv
import errno
import fcntl
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lungrt.cli import app
from lungrt.inference.infer import collect_inputs
from lungrt.data.io import read_xray, write_png
from lungrt.data.phantoms import make_phantom

from .test_io import make_dicom

runner = CliRunner()


def _png(path: Path, seed: int = 0, size: int = 96) -> Path:
    write_png(path, (make_phantom(seed, size).image * 255).astype(np.uint8))
    return path


def _csv(out: Path) -> list[dict]:
    with open(out / "results.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _infer(inputs, out, ckpt, *extra):
    return runner.invoke(
        app,
        [
            "infer",
            *map(str, inputs),
            "--out",
            str(out),
            "--model",
            str(ckpt),
            "--backend",
            "torch",
            "--batch-size",
            "2",
            *extra,
        ],
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


# 1 ------------------------------------------------------------------------------------------------
def test_same_file_names_get_distinct_outputs(tmp_path, tiny_checkpoint):
    srcs = [_png(tmp_path / d / "x.png", seed=i) for i, d in enumerate("abc")]
    out = tmp_path / "out"
    res = _infer(srcs, out, tiny_checkpoint)
    assert res.exit_code == 0, res.output
    rows = _csv(out)
    assert sorted(r["path"] for r in rows) == sorted(map(str, srcs))
    masks = {r["mask"] for r in rows}
    assert len(masks) == 3 and all((out / m).is_file() for m in masks)
    # each mask is that image's own: the three phantoms differ, so do their masks
    assert len({(out / m).read_bytes() for m in masks}) == 3


def test_sites_with_the_same_folder_layout_do_not_collide(tmp_path):
    for site in ("siteA", "siteB"):
        _png(tmp_path / site / "images" / "p1.png")
    items = collect_inputs([str(tmp_path / "siteA" / "images"), str(tmp_path / "siteB" / "images")])
    rels = sorted(str(i.rel) for i in items)
    assert rels == ["siteA/images/p1", "siteB/images/p1"]


def test_glob_over_sibling_folders_with_a_common_prefix(tmp_path):
    _png(tmp_path / "g" / "base" / "a.png")
    _png(tmp_path / "g" / "base_more" / "a.png")
    items = collect_inputs([str(tmp_path / "g" / "base*" / "*.png")])
    assert sorted(str(i.rel) for i in items) == ["base/a", "base_more/a"]


# 2 ------------------------------------------------------------------------------------------------
def test_only_lungrt_temp_files_are_removed(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    users = out / "sub" / ".notes.tmp"
    users.write_text("a user's file")
    ours = out / "sub" / ".p.mask.png.abc123.lungrt-tmp"
    ours.write_text("half a mask")
    res = _infer([_png(tmp_path / "in" / "p.png")], out, tiny_checkpoint)
    assert res.exit_code == 0, res.output
    assert users.read_text() == "a user's file" and not ours.exists()


def test_empty_out_is_refused(tmp_path, tiny_checkpoint):
    res = runner.invoke(app, ["infer", str(_png(tmp_path / "p.png")), "--out", "", "--model", str(tiny_checkpoint)])
    assert res.exit_code == 2 and "--out" in res.output
    assert not list(Path.cwd().glob("*.mask.png"))


# 3 ------------------------------------------------------------------------------------------------
def test_second_run_on_a_busy_out_is_refused(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lungrt-lock", "w") as lock:  # another process holds the folder
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = _infer([_png(tmp_path / "p.png")], out, tiny_checkpoint)
    assert res.exit_code == 2 and "in use by another" in _one_line(res.output)
    assert not (out / "results.csv").exists()
    res = _infer([_png(tmp_path / "p.png")], out, tiny_checkpoint)  # released: fine
    assert res.exit_code == 0, res.output


# 4 ------------------------------------------------------------------------------------------------
def test_non_utf8_and_very_long_names(tmp_path, tiny_checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    bad = os.fsdecode(b"bad-\xff\xfe-name.png")
    _png(folder / bad)
    long = "L" * 235 + ".png"
    _png(folder / long)
    out = tmp_path / "out"
    for extra in ((), ("--resume",)):
        res = _infer([folder], out, tiny_checkpoint, "--overlay", *extra)
        assert res.exit_code == 0, res.output
        rows = _csv(out)
        assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
        assert all((out / r["mask"]).is_file() for r in rows)


# 5 ------------------------------------------------------------------------------------------------
@pytest.fixture()
def half_done(tmp_path, tiny_checkpoint):
    folder = tmp_path / "in"
    for i in range(4):
        _png(folder / f"p{i}.png", seed=i)
    out = tmp_path / "out"
    assert _infer([folder / "p0.png", folder / "p1.png"], out, tiny_checkpoint).exit_code == 0
    return folder, out


def test_resume_with_other_model_or_options_is_refused(half_done, tiny_checkpoint, tmp_path):
    folder, out = half_done
    res = _infer([folder], out, tiny_checkpoint, "--resume", "--no-postprocess")
    assert res.exit_code == 2 and "postprocess" in _one_line(res.output)
    other = tmp_path / "other.safetensors"
    from lungrt.models.checkpoint import load_checkpoint, save_checkpoint

    loaded = load_checkpoint(tiny_checkpoint)
    with __import__("torch").no_grad():
        next(loaded.model.parameters()).add_(0.01)
    save_checkpoint(other, loaded.model, loaded.info)
    res = _infer([folder], out, other, "--resume")
    assert res.exit_code == 2 and "weights" in _one_line(res.output)
    assert len(_csv(out)) == 2  # nothing mixed in


def test_resume_redoes_an_input_replaced_under_the_same_name(half_done, tiny_checkpoint):
    folder, out = half_done
    before = {r["path"]: r["lung_fraction"] for r in _csv(out)}
    img = np.zeros((150, 90), np.uint8)  # another image, another size
    write_png(folder / "p0.png", img)
    res = _infer([folder / "p0.png", folder / "p1.png"], out, tiny_checkpoint, "--resume")
    assert res.exit_code == 0, res.output
    rows = {r["path"]: r for r in _csv(out)}
    assert rows[str(folder / "p0.png")]["height"] == "150"
    assert rows[str(folder / "p1.png")]["lung_fraction"] == before[str(folder / "p1.png")]
    assert "1 already done" in _one_line(res.output)


# 6 ------------------------------------------------------------------------------------------------
def test_nan_pixels_in_a_float_tiff_are_ignored_in_the_window(tmp_path):
    ph = make_phantom(3, 96).image.astype(np.float32) * 1000
    ph[10, 10] = np.nan
    ph[20, 20] = np.inf
    Image.fromarray(ph, mode="F").save(tmp_path / "f.tif")
    xr = read_xray(tmp_path / "f.tif")
    assert np.isfinite(xr.pixels).all() and xr.pixels.std() > 0.1
    clean = make_phantom(3, 96).image.astype(np.float32) * 1000
    Image.fromarray(clean, mode="F").save(tmp_path / "c.tif")
    assert np.mean(np.abs(read_xray(tmp_path / "c.tif").pixels - xr.pixels)) < 0.01


def test_all_nan_image_is_an_error_row(tmp_path):
    Image.fromarray(np.full((64, 64), np.nan, np.float32), mode="F").save(tmp_path / "n.tif")
    from lungrt.core.errors import ImageReadError

    with pytest.raises(ImageReadError, match="no finite pixel"):
        read_xray(tmp_path / "n.tif")


# 7 ------------------------------------------------------------------------------------------------
def test_batch_size_is_clamped_to_the_number_of_inputs(tmp_path, tiny_checkpoint, monkeypatch):
    from lungrt.backends.pytorch import TorchRunner

    seen = []
    real = TorchRunner.run
    monkeypatch.setattr(TorchRunner, "run", lambda self, x: seen.append(len(x)) or real(self, x))
    res = runner.invoke(
        app,
        [
            "infer",
            str(_png(tmp_path / "p.png")),
            "--out",
            str(tmp_path / "o"),
            "--model",
            str(tiny_checkpoint),
            "--backend",
            "torch",
            "--batch-size",
            "256",
        ],
    )
    assert res.exit_code == 0, res.output
    assert seen == [1]


# 8 ------------------------------------------------------------------------------------------------
def test_derived_onnx_goes_to_the_cache_and_is_verified(tmp_path, tiny_checkpoint, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LUNGRT_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    args = [
        "infer",
        str(_png(tmp_path / "p.png")),
        "--out",
        str(tmp_path / "o"),
        "--model",
        str(tiny_checkpoint),
        "--backend",
        "onnxruntime",
    ]
    assert runner.invoke(app, args).exit_code == 0
    assert not (tmp_path / "engines").exists()
    (variant,) = cache.rglob("*.fp32.onnx")
    variant.write_bytes(variant.read_bytes()[:1000])  # truncated by a crash or a full disk
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert variant.stat().st_size > 1000  # regenerated


# 9 ------------------------------------------------------------------------------------------------
def test_disk_full_is_one_line_and_keeps_what_is_done(tmp_path, tiny_checkpoint, monkeypatch):
    import lungrt.inference.measure as infer_mod

    folder = tmp_path / "in"
    for i in range(6):
        _png(folder / f"p{i}.png", seed=i)
    real = infer_mod.atomic_write_bytes
    calls = {"n": 0}

    def filling_disk(path, data, durable=True):
        calls["n"] += 1
        if calls["n"] > 3 and str(path).endswith(".mask.png"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data, durable)

    monkeypatch.setattr(infer_mod, "atomic_write_bytes", filling_disk)
    out = tmp_path / "out"
    res = _infer([folder], out, tiny_checkpoint)
    text = _one_line(res.output)
    assert res.exit_code == 2 and "No space left" in text and "--resume" in text and "Traceback" not in text
    done = _csv(out)
    assert len(done) == 3 and all((out / r["mask"]).is_file() for r in done)
    monkeypatch.setattr(infer_mod, "atomic_write_bytes", real)
    res = _infer([folder], out, tiny_checkpoint, "--resume")
    assert res.exit_code == 0 and len(_csv(out)) == 6


# 10 -----------------------------------------------------------------------------------------------
def test_out_that_is_a_file_is_one_line(tmp_path, tiny_checkpoint):
    (tmp_path / "o").write_text("x")
    res = _infer([_png(tmp_path / "p.png")], tmp_path / "o", tiny_checkpoint)
    assert res.exit_code == 2 and "not a folder" in _one_line(res.output)


def test_garbage_onnx_is_one_line(tmp_path):
    (tmp_path / "g.onnx").write_bytes(b"garbage")
    res = runner.invoke(
        app, ["infer", str(_png(tmp_path / "p.png")), "--out", str(tmp_path / "o"), "--onnx", str(tmp_path / "g.onnx")]
    )
    assert res.exit_code == 2 and "g.onnx" in res.output and "Traceback" not in res.output


def test_symlink_loops_never_hang_and_get_rows(tmp_path, tiny_checkpoint):
    folder = tmp_path / "in"
    _png(folder / "ok.png")
    (folder / "loop").symlink_to(folder)  # a folder loop
    (folder / "self.png").symlink_to(folder / "self.png")  # a file loop
    (folder / "gone.png").symlink_to(tmp_path / "missing.png")  # dangling
    direct = tmp_path / "direct.png"
    direct.symlink_to(direct)
    out = tmp_path / "out"
    res = _infer([folder, direct, f"{folder}/**/*.png"], out, tiny_checkpoint)
    assert res.exit_code == 3, res.output
    rows = {Path(r["path"]).name: r for r in _csv(out)}
    assert rows["ok.png"]["status"] == "ok"
    for name in ("self.png", "gone.png", "direct.png"):
        assert rows[name]["status"] == "error" and rows[name]["error"], name


def test_unreadable_subfolder_gets_a_row(tmp_path, tiny_checkpoint):
    if os.geteuid() == 0:
        pytest.skip("root reads every folder; permissions cannot make one unreadable")
    folder = tmp_path / "in"
    _png(folder / "ok.png")
    (folder / "locked").mkdir()
    os.chmod(folder / "locked", 0)
    try:
        res = _infer([folder], tmp_path / "out", tiny_checkpoint)
    finally:
        os.chmod(folder / "locked", 0o755)
    assert res.exit_code == 3 and any(r["path"].endswith("locked") for r in _csv(tmp_path / "out"))


def test_absurd_checkpoint_width_is_refused_before_allocation(tmp_path, tiny_checkpoint):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tiny_checkpoint), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["lungrt"])
    info["width"] = 100000
    save_file(tensors, str(tmp_path / "w.safetensors"), metadata={**meta, "lungrt": json.dumps(info)})
    res = _infer([_png(tmp_path / "p.png")], tmp_path / "o", tmp_path / "w.safetensors")
    assert res.exit_code == 2 and "width" in res.output


def test_bench_batch_size_zero_and_json_dir_are_one_line(tmp_path, tiny_checkpoint):
    res = runner.invoke(app, ["bench", "--model", str(tiny_checkpoint), "--batch-sizes", "0"])
    assert res.exit_code == 2 and "batch" in res.output and "Traceback" not in res.output
    res = _infer([_png(tmp_path / "p.png")], tmp_path / "o", tiny_checkpoint, "--json", str(tmp_path))
    assert res.exit_code == 2 and "--json" in res.output


# 11 -----------------------------------------------------------------------------------------------
def test_exif_orientation_is_applied(tmp_path):
    img = np.zeros((40, 80), np.uint8)
    img[:, :10] = 255  # bright left edge
    im = Image.fromarray(img)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    xr = read_xray(tmp_path / "r.jpg")
    assert xr.shape == (80, 40)  # as displayed
    assert xr.gray8[:10].mean() > 200  # the bright edge is on top once rotated


def test_newlines_in_names_are_not_in_output_names(tmp_path):
    _png(tmp_path / "in" / "a\nb.png")
    (item,) = collect_inputs([str(tmp_path / "in")])
    assert "\n" not in str(item.rel)


def test_outputs_follow_the_umask(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert _infer([_png(tmp_path / "p.png")], out, tiny_checkpoint).exit_code == 0
    finally:
        os.umask(old)
    (mask,) = out.rglob("*.mask.png")
    assert mask.stat().st_mode & 0o777 == 0o644
    assert (out / "results.csv").stat().st_mode & 0o777 == 0o644


def test_records_symlink_is_not_followed(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / ".lungrt-records").symlink_to(elsewhere)
    res = _infer([_png(tmp_path / "p.png")], out, tiny_checkpoint)
    assert res.exit_code == 2 and ".lungrt-records" in res.output
    assert not list(elsewhere.iterdir())


def test_out_inside_the_input_folder_does_not_segment_its_own_masks(tmp_path, tiny_checkpoint):
    folder = tmp_path / "in"
    _png(folder / "p.png")
    for _ in range(2):
        res = _infer([folder], folder, tiny_checkpoint)
        assert res.exit_code == 0, res.output
        assert [Path(r["path"]).name for r in _csv(folder)] == ["p.png"]


def test_fp16_on_cpu_torch_is_refused(tmp_path, tiny_checkpoint):
    res = runner.invoke(
        app,
        [
            "infer",
            str(_png(tmp_path / "p.png")),
            "--out",
            str(tmp_path / "o"),
            "--model",
            str(tiny_checkpoint),
            "--backend",
            "torch",
            "--precision",
            "fp16",
        ],
    )
    assert res.exit_code == 2 and "fp16" in res.output


def test_non_finite_weights_are_refused(tmp_path, tiny_checkpoint):
    import torch

    from lungrt.models.checkpoint import load_checkpoint, save_checkpoint
    from lungrt.core.errors import CheckpointError

    loaded = load_checkpoint(tiny_checkpoint)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.fill_(float("nan"))
    save_checkpoint(tmp_path / "nan.safetensors", loaded.model, loaded.info)
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(tmp_path / "nan.safetensors")


def test_truncated_dicom_says_so(tmp_path):
    from lungrt.core.errors import ImageReadError

    make_dicom(tmp_path / "s.dcm", (make_phantom(1, 64).image * 4095).astype(np.uint16))
    data = (tmp_path / "s.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 3000])
    with pytest.raises(ImageReadError, match="cut short|truncated"):
        read_xray(tmp_path / "cut.dcm")


def test_package_with_bad_metadata_is_one_line(tmp_path):
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"engine")
    (tmp_path / "m.plan.json").write_text("{not json")
    res = runner.invoke(app, ["package", "--engine", str(plan), "--triton", str(tmp_path / "repo")])
    assert res.exit_code == 2 and "m.plan" in res.output and "Traceback" not in res.output
    (tmp_path / "m.plan.json").write_text(json.dumps({"model": {"name": "unet"}, "flavour": "tensorrt"}))
    res = runner.invoke(app, ["package", "--engine", str(plan), "--triton", str(tmp_path / "repo")])
    assert res.exit_code == 2 and "lacks" in res.output


def test_unreadable_folder_errors_become_rows(tmp_path, monkeypatch):
    """Where permissions cannot make a folder unreadable (root), the walk's error report is simulated."""
    import lungrt.inference.infer as infer_mod

    _png(tmp_path / "in" / "ok.png")
    real_walk = os.walk

    def walk_with_error(top, **kw):
        kw["onerror"](PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "in" / "locked")))
        yield from real_walk(top, **kw)

    monkeypatch.setattr(infer_mod.os, "walk", walk_with_error)
    items = collect_inputs([str(tmp_path / "in")])
    errs = [i for i in items if i.error]
    assert len(items) == 2 and errs and "unreadable folder" in errs[0].error and errs[0].source.name == "locked"


def test_fifos_never_hang_and_get_rows(tmp_path, tiny_checkpoint):
    """A FIFO (no writer) among the inputs blocked the listing (no extension: its DICOM magic was
    read) or the run (x.png) forever. Special files are rows, never opened; the run is bounded."""
    import subprocess
    import sys

    folder = tmp_path / "in"
    _png(folder / "ok.png")
    os.mkfifo(folder / "x.png")
    os.mkfifo(folder / "noext")
    direct = tmp_path / "direct.png"
    os.mkfifo(direct)
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lungrt.cli",
            "infer",
            str(folder),
            str(direct),
            "--out",
            str(out),
            "--model",
            str(tiny_checkpoint),
            "--backend",
            "torch",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    rows = {Path(r["path"]).name: r for r in _csv(out)}
    assert rows["ok.png"]["status"] == "ok"
    for name in ("x.png", "noext", "direct.png"):
        assert rows[name]["status"] == "error" and "not a regular file" in rows[name]["error"], rows[name]


def test_error_cells_are_one_line(tmp_path, tiny_checkpoint, monkeypatch):
    """A decoder's message with newlines and tabs (as pydicom's plugin errors have) stays one CSV cell line."""
    from lungrt.inference import stream as infer_mod

    def garbled(path, *a, **k):
        raise RuntimeError("cannot decode:\n\tall plugins are missing dependencies:\n\tgdcm\tpylibjpeg")

    folder = tmp_path / "in"
    _png(folder / "a.png")
    monkeypatch.setattr(infer_mod, "read_xray", garbled)
    res = _infer([folder], tmp_path / "out", tiny_checkpoint)
    assert res.exit_code == 3, res.output
    (row,) = _csv(tmp_path / "out")
    assert row["error"] == "RuntimeError: cannot decode: all plugins are missing dependencies: gdcm pylibjpeg"


def test_results_are_synced_on_their_own_filesystem_only(tmp_path, tiny_checkpoint, monkeypatch):
    """os.sync flushes every filesystem of the host (a shared server's too); infer syncs its output's."""

    def host_wide_sync():
        raise AssertionError("os.sync called")

    monkeypatch.setattr(os, "sync", host_wide_sync)
    _png(tmp_path / "in" / "a.png")
    res = _infer([tmp_path / "in"], tmp_path / "out", tiny_checkpoint)
    assert res.exit_code == 0, res.output


def test_summary_covers_the_whole_run_across_resumes(half_done, tiny_checkpoint):
    """summary.json kept only the last invocation: after a --resume the report showed its speed, or
    0.0 img/s when nothing was left. Each invocation is kept, with the whole run's totals."""
    from lungrt.inference.journal import records_folder
    from lungrt.inference.report import write_report

    folder, out = half_done
    files = sorted(folder.glob("p*.png"))  # the same inputs, so the same output names as the first invocation
    assert _infer(files, out, tiny_checkpoint, "--resume").exit_code == 0  # the other two
    res = _infer(files, out, tiny_checkpoint, "--resume")  # nothing left
    assert (
        res.exit_code == 0 and "nothing left to do" in _one_line(res.output) and "4 processed" in _one_line(res.output)
    )
    run = json.loads((records_folder(out) / "summary.json").read_text())["run"]
    assert [i["ok"] for i in run["invocations"]] == [2, 2, 0] and run["processed"] == 4
    assert run["images_per_second"] == pytest.approx(4 / run["seconds"])
    page = write_report(out).read_text()
    assert f"{run['images_per_second']:.1f} img/s over 3 invocations" in page
    assert _infer(files, out, tiny_checkpoint).exit_code == 0  # a fresh run starts the list again
    assert len(json.loads((records_folder(out) / "summary.json").read_text())["run"]["invocations"]) == 1
