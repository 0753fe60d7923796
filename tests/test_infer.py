"""`lungrt infer`: mixed good/broken folders, original sizes, odd names, SIGKILL + resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lungrt.cli import app
from lungrt.data.io import write_png
from lungrt.inference.journal import read_records
from lungrt.data.phantoms import make_phantom

from .test_io import make_dicom

runner = CliRunner()


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "results.csv") as f:
        return {Path(r["path"]).name: r for r in csv.DictReader(f)}


@pytest.fixture()
def mixed_folder(tmp_path):
    d = tmp_path / "in"
    for i in range(3):
        write_png(d / f"ok_{i}.png", (make_phantom(i, 128).image * 255).astype(np.uint8))
    wide = make_phantom(7, 96, 160)  # non-square: mask must come back 96 x 160
    write_png(d / "nested" / "wide.png", (wide.image * 255).astype(np.uint8))
    ph = make_phantom(8, 112, 100)
    make_dicom(d / "nested" / "scan.dcm", (ph.image * 4095).astype(np.uint16), spacing=(0.5, 0.4))
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("not an image")
    write_png(d / "huge_dims.png", np.zeros((8, 8), np.uint8))  # too small: rejected with reason
    return d


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


def test_mixed_folder_rows_sizes_and_exit_code(mixed_folder, tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    res = _infer([mixed_folder], out, tiny_checkpoint, "--overlay", "--probabilities")
    assert res.exit_code == 3, res.output  # some inputs failed
    rows = _rows(out)
    assert len(rows) == 8
    bad = {k: v for k, v in rows.items() if v["status"] == "error"}
    assert set(bad) == {"empty.png", "text.png", "huge_dims.png"}
    assert "empty" in bad["empty.png"]["error"] and "too small" in bad["huge_dims.png"]["error"]
    wide = Image.open(out / "in" / "nested" / "wide.mask.png")
    assert wide.size == (160, 96)
    dcm = rows["scan.dcm"]
    assert Image.open(out / "in" / "nested" / "scan.mask.png").size == (100, 112)
    assert int(dcm["width"]) == 100 and int(dcm["height"]) == 112
    px = int(dcm["right_lung_px"]) + int(dcm["left_lung_px"])
    mm2 = float(dcm["right_lung_mm2"]) + float(dcm["left_lung_mm2"])
    assert px > 0 and mm2 == pytest.approx(px * 0.2, rel=1e-3)
    assert (out / "in" / "ok_0.overlay.png").exists() and (out / "in" / "ok_0.prob.png").exists()
    assert set(np.unique(np.asarray(Image.open(out / "in" / "ok_0.mask.png").convert("L")))) <= {0, 255}


def test_all_good_exits_zero_and_strict_stops(mixed_folder, tmp_path, tiny_checkpoint):
    good = [mixed_folder / f"ok_{i}.png" for i in range(3)]
    assert _infer(good, tmp_path / "a", tiny_checkpoint).exit_code == 0
    res = _infer([mixed_folder / "empty.png", *good], tmp_path / "b", tiny_checkpoint, "--strict")
    assert res.exit_code == 3
    assert len(_rows(tmp_path / "b")) == 1  # stopped at the first bad input


def test_outputs_stay_inside_for_odd_names(tmp_path, tiny_checkpoint):
    d = tmp_path / "odd"
    img = (make_phantom(1, 64).image * 255).astype(np.uint8)
    for name in ("..png", ".hidden.png", "-dash.png", "spa ce.png", "ünï cødé.png", "a.b.c.png"):
        write_png(d / name, img)
    out = tmp_path / "out"
    res = _infer([d, str(d / "*.png"), d / "..png", d / ".hidden.png"], out, tiny_checkpoint)
    assert res.exit_code == 0, res.output
    written = [p for p in tmp_path.rglob("*.mask.png")]
    assert written and all(out in p.parents for p in written)
    # folder listing and globs skip dotfiles; named explicitly, they are processed, safely renamed
    assert len(_rows(out)) == 6
    assert not [
        p
        for p in out.rglob("*")
        if p.name.startswith(".")
        and p.name not in (".lungrt-records", ".lungrt-lock")
        and ".lungrt-records" not in p.parts
    ]


def test_missing_input_is_one_line_error(tmp_path, tiny_checkpoint):
    res = _infer([tmp_path / "nothing_here"], tmp_path / "o", tiny_checkpoint)
    assert res.exit_code == 2 and "nothing_here" in res.output


def test_resume_redoes_an_output_cut_short(tmp_path, tiny_checkpoint):
    """Per-image files are not fsynced; a mask cut short by a power loss must not count as done."""
    d = tmp_path / "in"
    for i in range(3):
        write_png(d / f"ok_{i}.png", (make_phantom(i, 128).image * 255).astype(np.uint8))
    out = tmp_path / "out"
    assert _infer([d], out, tiny_checkpoint).exit_code == 0
    mask = out / "in" / "ok_1.mask.png"
    whole = mask.read_bytes()
    mask.write_bytes(whole[: len(whole) // 2])
    res = _infer([d], out, tiny_checkpoint, "--resume")
    assert res.exit_code == 0 and "2 already done" in res.output, res.output
    assert mask.read_bytes() == whole


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")
@pytest.mark.parametrize("sleeps", [True, False])
def test_helpers_take_only_idle_cpu_beside_a_sleeping_runner(tmp_path, tiny_checkpoint, monkeypatch, sleeps):
    import lungrt.inference.infer as infer
    from lungrt.models.checkpoint import resolve_model
    from lungrt.backends.pytorch import TorchRunner

    d = tmp_path / "in"
    for i in range(2):
        write_png(d / f"ok_{i}.png", (make_phantom(i, 96).image * 255).astype(np.uint8))
    policies = []
    import lungrt.inference.stream as stream

    real_read = stream.read_xray
    monkeypatch.setattr(
        stream, "read_xray", lambda p, **kw: (policies.append(os.sched_getscheduler(0)), real_read(p, **kw))[1]
    )
    model = TorchRunner(resolve_model(str(tiny_checkpoint)))
    model.sleeps_when_idle = sleeps
    summary = infer.run_infer(model, infer.collect_inputs([str(d)]), tmp_path / "out", infer.InferOptions(batch_size=2))
    assert summary["ok"] == 2 and len(policies) == 2
    assert set(policies) == {os.SCHED_IDLE if sleeps else os.SCHED_OTHER}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the calling thread keeps its priority


def _snapshot(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and ".lungrt-records" not in p.parts and p.name != ".lungrt-lock"
    }


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, tiny_checkpoint):
    d = tmp_path / "many"
    for i in range(40):
        write_png(d / f"img_{i:03d}.png", (make_phantom(100 + i, 160).image * 255).astype(np.uint8))
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cmd = [
        sys.executable,
        "-m",
        "lungrt.cli",
        "infer",
        str(d),
        "--model",
        str(tiny_checkpoint),
        "--backend",
        "torch",
        "--batch-size",
        "2",
        "--workers",
        "1",
        "--overlay",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd + ["--out", str(tmp_path / "full")], check=False, env=env, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.rglob("*.mask.png"))) < 8:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(read_records(killed))
    assert 0 < done_before < 41, "the kill must land mid-run"
    res = subprocess.run(cmd + ["--out", str(killed), "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 3, res.stderr  # the broken file is still reported
    assert "already done" in res.stdout
    full, resumed = _snapshot(tmp_path / "full"), _snapshot(killed)
    assert full.keys() == resumed.keys()
    for k in full:
        if k != "results.csv":
            assert full[k] == resumed[k], k
    assert (tmp_path / "full" / "results.csv").read_text() == (killed / "results.csv").read_text()
    assert not [p for p in killed.rglob("*lungrt-tmp")]  # no half-written files left behind


def test_journal_keeps_whole_lines_latest_run_wins(tmp_path):
    from lungrt.inference.journal import journal_for, start_fresh

    out = tmp_path / "out"
    journal_for(out).append({"rel": "a", "status": "error"})
    journal_for(out).append({"rel": "b", "status": "ok"})
    first = journal_for(out).path
    with open(first, "ab") as f:
        f.write(b'{"rel": "c", "stat')  # a line cut short by a power loss
    time.sleep(0.001)
    later = out / ".lungrt-records" / f"{time.time_ns():020d}-otherhost-1.jsonl"  # a later run, another process
    later.write_text('{"rel": "a", "status": "ok"}\n')
    rows = read_records(out)
    assert set(rows) == {"a", "b"} and rows["a"]["status"] == "ok"
    start_fresh(out)
    assert read_records(out) == {}
    journal_for(out).append({"rel": "d", "status": "ok"})  # a new file after the old ones were removed
    assert set(read_records(out)) == {"d"} and journal_for(out).path != first


def test_one_bit_masks_hold_the_very_pixels_of_the_eight_bit_ones(tmp_path, tiny_checkpoint):
    import cv2

    src = tmp_path / "in"
    for i in range(3):
        write_png(src / f"x{i}.png", (make_phantom(70 + i, 301 + 17 * i, 257).image * 255).astype(np.uint8))
    one, eight = tmp_path / "one", tmp_path / "eight"
    for out, bits in ((one, "1"), (eight, "8")):
        res = runner.invoke(
            app,
            [
                "infer",
                str(src),
                "--out",
                str(out),
                "--model",
                str(tiny_checkpoint),
                "--backend",
                "torch",
                "--mask-bits",
                bits,
            ],
        )
        assert res.exit_code == 0, res.output
    for i in range(3):
        a, b = (out / "in" / f"x{i}.mask.png" for out in (one, eight))
        with Image.open(a) as im:
            assert im.mode == "1"
        pa, pb = cv2.imread(str(a), cv2.IMREAD_UNCHANGED), cv2.imread(str(b), cv2.IMREAD_UNCHANGED)
        assert pa.dtype == np.uint8 and np.array_equal(pa, pb) and set(np.unique(pa)) <= {0, 255}
        assert np.array_equal(np.array(Image.open(a).convert("L")), pb)


def test_native_dicom_read_reduced_gives_the_masks_of_the_whole_image(tmp_path, tiny_checkpoint):
    """Without --overlay, infer reduces a native detector DICOM to the network's size while reading
    it (its megapixels never held); with --overlay it keeps the whole image: same masks and rows."""
    import cv2

    from lungrt.data.dicom import write_dicom

    rng = np.random.default_rng(4)
    film = cv2.resize((make_phantom(9, 256).image * 3500 + 300), (1373, 1531), interpolation=cv2.INTER_LINEAR)
    (tmp_path / "in").mkdir()
    write_dicom(tmp_path / "in" / "native.dcm", (film + rng.normal(0, 20, film.shape)).clip(0, 4095).astype(np.uint16))
    outs = {flags: tmp_path / f"out{len(flags)}" for flags in ((), ("--overlay",))}
    for flags, out in outs.items():
        res = _infer([tmp_path / "in"], out, tiny_checkpoint, *flags)
        assert res.exit_code == 0, res.output
    plain, whole = (_rows(out)["native.dcm"] for out in outs.values())
    keep = ("status", "width", "height", "right_lung_px", "left_lung_px", "right_lung_mm2", "qc", "mean_confidence")
    assert {k: plain[k] for k in keep} == {k: whole[k] for k in keep} and plain["width"] == "1373"
    masks = [(out / plain["mask"]).read_bytes() for out in outs.values()]
    assert masks[0] == masks[1]


def test_process_pool_writes_what_the_thread_pool_writes(mixed_folder, tmp_path, tiny_checkpoint):
    """--pool process (decoding and writing in spawned helper processes that send back the network
    input and the X-ray's facts, not its pixels): the same rows, masks and overlays, byte for byte;
    each helper keeps its own journal; --resume sees their work as done."""
    outs = {}
    for pool in ("thread", "process"):
        outs[pool] = tmp_path / pool
        res = _infer([mixed_folder], outs[pool], tiny_checkpoint, "--overlay", "--pool", pool)
        assert res.exit_code == 3, res.output
    keep = ("status", "error", "width", "height", "right_lung_px", "left_lung_px", "right_lung_mm2", "qc", "mask")
    thread_rows, process_rows = _rows(outs["thread"]), _rows(outs["process"])
    assert {k: {f: r[f] for f in keep} for k, r in process_rows.items()} == {
        k: {f: r[f] for f in keep} for k, r in thread_rows.items()
    }
    written = sorted(p.relative_to(outs["thread"]) for p in outs["thread"].rglob("*.png"))
    assert len(written) == 10  # 5 readable inputs: a mask and an overlay each
    for rel in written:
        assert (outs["process"] / rel).read_bytes() == (outs["thread"] / rel).read_bytes(), rel
    assert len(list((outs["process"] / ".lungrt-records").glob("*.jsonl"))) >= 2  # the helpers' own journals
    summary = tmp_path / "again.json"
    again = _infer(
        [mixed_folder],
        outs["process"],
        tiny_checkpoint,
        "--overlay",
        "--pool",
        "process",
        "--resume",
        "--json",
        str(summary),
    )
    assert again.exit_code == 3, again.output
    assert json.loads(summary.read_text())["skipped_done"] == 5
    assert _infer([mixed_folder], tmp_path / "bad", tiny_checkpoint, "--pool", "fork").exit_code == 2
