"""`lungrt infer --ray` on a local Ray cluster the test starts itself: same outputs as the
single-machine path, error rows included; a killed Ray run resumes by redoing only what is missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lungrt.cli import app
from lungrt.data.io import write_png
from lungrt.inference.journal import read_records
from lungrt.data.phantoms import make_phantom

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'lungrt[ray]'")
runner = CliRunner()


@pytest.fixture(scope="module")
def ray_local():
    yield "local"
    ray.shutdown()


def _folder(d: Path, n: int, broken: bool = True) -> Path:
    for i in range(n):
        write_png(d / f"x_{i:03d}.png", (make_phantom(300 + i, 96 + 8 * (i % 3), 112).image * 255).astype(np.uint8))
    if broken:
        (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    return d


def _outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".lungrt-records" not in p.parts and p.name != ".lungrt-lock"}


def test_ray_local_matches_single_machine(tmp_path, tiny_checkpoint, ray_local):
    src = _folder(tmp_path / "in", 7)
    common = ["--model", str(tiny_checkpoint), "--backend", "torch", "--batch-size", "3", "--overlay"]
    single = runner.invoke(app, ["infer", str(src), "--out", str(tmp_path / "single"), *common])
    assert single.exit_code == 3, single.output
    distributed = runner.invoke(app, ["infer", str(src), "--out", str(tmp_path / "ray"), *common, "--ray", ray_local, "--actors", "1"])
    assert distributed.exit_code == 3, distributed.output
    a, b = _outputs(tmp_path / "single"), _outputs(tmp_path / "ray")
    assert a.keys() == b.keys() and len(a) == 7 * 2 + 1
    for k in a:
        assert a[k] == b[k], k  # masks, overlays and results.csv (error row included) byte for byte


def test_ray_without_extra_is_one_line_error(tmp_path, tiny_checkpoint, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *a, **k)

    src = _folder(tmp_path / "in", 1, broken=False)
    monkeypatch.setattr(builtins, "__import__", no_ray)
    res = runner.invoke(app, ["infer", str(src), "--out", str(tmp_path / "o"), "--model", str(tiny_checkpoint), "--ray", "local"])
    assert res.exit_code == 2 and "lungrt[ray]" in res.output


def test_killed_ray_run_resumes_only_missing(tmp_path, tiny_checkpoint):
    src = _folder(tmp_path / "in", 24, broken=False)
    cmd = [sys.executable, "-m", "lungrt.cli", "infer", str(src), "--model", str(tiny_checkpoint), "--backend", "torch",
           "--batch-size", "2", "--ray", "local"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    proc = subprocess.Popen(cmd + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(read_records(out)) < 4 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    done, settled = -1, len(read_records(out))
    while done != settled:  # a worker mid-write may finish before it notices its raylet is gone
        done = settled
        time.sleep(1.0)
        settled = len(read_records(out))
    assert 0 < done < 24, "the kill must land mid-run"
    res = subprocess.run(cmd + ["--out", str(out), "--resume"], env=env, capture_output=True, text=True, timeout=400,
                         start_new_session=True)
    assert res.returncode == 0, res.stderr[-2000:]
    import re

    redone = int(re.search(r"(\d+) ok", res.stdout).group(1))
    skipped = int(re.search(r"(\d+) already done", res.stdout).group(1))
    # a Ray worker can outlive its killed driver by a moment and finish one more image
    assert redone + skipped == 24 and skipped >= done and redone > 0
    single = runner.invoke(app, ["infer", str(src), "--out", str(tmp_path / "single"), "--model", str(tiny_checkpoint),
                                 "--backend", "torch", "--batch-size", "2"])
    assert single.exit_code == 0
    assert _outputs(out) == _outputs(tmp_path / "single")


def test_a_worker_in_another_folder_records_what_resume_compares(tmp_path, tiny_checkpoint, monkeypatch):
    """On a cluster, a Ray worker's working folder is not the driver's: an input given as a relative
    path must still be stat-ed (every journal line had "source_stat": null, so --resume redid every
    input). The writer task runs here from another folder, as such a worker would."""
    import json

    from lungrt.inference.infer import InferOptions, collect_inputs, is_done
    from lungrt.inference.ray import _read, _write
    from lungrt.models.checkpoint import resolve_model

    _folder(tmp_path / "in", 1, broken=False)
    monkeypatch.chdir(tmp_path)
    (item,) = collect_inputs(["in"])
    spec = resolve_model(str(tiny_checkpoint)).spec
    row = _read({"source": str(item.source), "abs": os.path.abspath(item.source), "rel": str(item.rel),
                 "known_error": ""}, spec.to_json())
    row = {**row, "prob": np.full((1, spec.size, spec.size), 0.9, np.float32)[0], "runner": "torch/cpu/fp32", "model": "unet"}
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the worker's own folder: "in/x_000.png" does not resolve here
    assert _write(row, str(tmp_path / "out"), spec.to_json(), {})["status"] == "ok"
    monkeypatch.chdir(tmp_path)
    (record,) = read_records(tmp_path / "out").values()
    assert record["source_stat"] and record["path"] == str(item.source)  # shown as typed
    assert is_done(tmp_path / "out", item, InferOptions(), {str(item.rel): record})
    assert json.dumps(record)  # a plain journal line
