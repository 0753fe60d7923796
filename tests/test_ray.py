"""`lungrt infer --ray` on Ray clusters the tests start themselves, each inside a private network
namespace that has only loopback (`unshare --net`), so no Ray traffic can reach another machine
even if Ray picked another address: `--ray local` and a real cluster of a head and two worker
nodes give the single-machine run's outputs byte for byte, survive a worker node and the driver
killed mid-run, and resume runs given relative paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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
SCENARIOS = Path(__file__).with_name("ray_scenarios.py")
# In the namespace, lo also carries a documentation-range address with the default route: the
# address Ray would pick for itself if nothing kept it on 127.0.0.1 (it reaches nothing: there is
# no other interface).
LOOPBACK_ONLY = 'ip link set lo up && exec "$@"'
WITH_DECOY = (
    "ip link set lo up && ip addr add 198.51.100.7/32 dev lo && ip route add default dev lo src 198.51.100.7"
    ' && exec "$@"'
)


def _sealed_namespace_or_skip() -> None:
    if not (shutil.which("unshare") and shutil.which("ip") and shutil.which("ss")):
        pytest.skip("needs unshare (util-linux), ip and ss (iproute2): apt-get install util-linux iproute2")
    probe = subprocess.run(
        ["unshare", "--net", "--", "sh", "-c", WITH_DECOY + " && true", "sh", "true"], capture_output=True, text=True
    )
    if probe.returncode:
        pytest.skip(f"cannot make a private network namespace (needs root or CAP_SYS_ADMIN): {probe.stderr.strip()}")


def run_scenario(name: str, ckpt: Path, src: Path, work: Path, setup: str, timeout: int = 240) -> dict:
    _sealed_namespace_or_skip()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    res = subprocess.run(
        [
            "unshare",
            "--net",
            "--",
            "sh",
            "-c",
            setup,
            "sh",
            sys.executable,
            str(SCENARIOS),
            name,
            str(ckpt),
            str(src),
            str(work),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((work / f"{name}.json").read_text())


def _folder(d: Path, n: int, broken: bool = True) -> Path:
    for i in range(n):
        write_png(d / f"x_{i:03d}.png", (make_phantom(300 + i, 96 + 8 * (i % 3), 112).image * 255).astype(np.uint8))
    if broken:
        (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    return d


def _with_non_radiograph(d: Path) -> Path:
    """A DICOM that holds no radiograph (pydicom's RT structure set): skipped by every front door alike."""
    from pydicom.data import get_testdata_file

    shutil.copy(get_testdata_file("rtstruct.dcm"), d / "rtstruct.dcm")
    return d


def _outputs(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and ".lungrt-records" not in p.parts and p.name != ".lungrt-lock"
    }


def _single_machine(src: Path, out: Path, ckpt: Path, *extra: str) -> dict[str, bytes]:
    res = runner.invoke(
        app,
        ["infer", str(src), "--out", str(out), "--model", str(ckpt), "--backend", "torch", "--batch-size", "2", *extra],
    )
    assert res.exit_code in (0, 3), res.output
    return _outputs(out)


def _only_loopback(facts: dict) -> None:
    assert facts["nodes"] and set(facts["nodes"]) == {"127.0.0.1"}, facts["nodes"]
    exposed = [a for a in facts["listening"] if not a.rsplit(":", 1)[0].strip("[]").endswith("127.0.0.1")]
    assert not exposed, exposed  # not 0.0.0.0, *, nor the decoy address


def test_ray_local_binds_loopback_and_matches_single_machine(tmp_path, tiny_checkpoint):
    """`--ray local` stays on 127.0.0.1 although the namespace offers Ray another address (which a
    plain `ray.init` takes, and listens on every interface)."""
    src = _with_non_radiograph(_folder(tmp_path / "in", 7))
    facts = run_scenario("local", tiny_checkpoint, src, tmp_path, WITH_DECOY)
    assert facts["exit_code"] == 3, facts["output"]  # the broken input is a row
    assert "WARNING" not in facts["output"] and "Token authentication" not in facts["output"], facts["output"]
    _only_loopback(facts)
    single = _single_machine(src, tmp_path / "single", tiny_checkpoint, "--overlay")
    assert len(single) == 7 * 2 + 1 and _outputs(tmp_path / "local") == single  # masks, overlays, results.csv


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory, tiny_checkpoint):
    work = tmp_path_factory.mktemp("ray_cluster")
    src = _folder(work / "in", 24, broken=False)
    facts = run_scenario("cluster", tiny_checkpoint, src, work, LOOPBACK_ONLY, timeout=400)
    single = _single_machine(src, work / "single", tiny_checkpoint)
    return facts, work, single


def test_three_node_cluster_on_loopback_matches_single_machine(cluster_run):
    facts, work, single = cluster_run
    assert facts["undisturbed"]["exit_code"] == 0, facts["undisturbed"]["output"]
    assert facts["nodes"] == ["127.0.0.1"] * 3  # a head and two worker nodes, each its own raylet
    _only_loopback(facts)
    assert _outputs(work / "cluster") == single  # masks and results.csv byte for byte


def test_a_worker_node_killed_mid_run_changes_nothing(cluster_run):
    facts, work, single = cluster_run
    killed = facts["node_killed"]
    assert killed.get("killed") and 0 < killed["records_before"] < 24, killed  # the kill landed mid-run
    assert killed["exit_code"] == 0, killed["output"]
    assert killed["nodes_after"] == ["127.0.0.1"] * 2
    assert len(read_records(work / "node_killed")) == 24
    # each input finished once; Ray may re-run a batch whose results died with the node (writes are atomic)
    assert 24 <= killed["journal_lines"] <= 24 + 2, killed["journal_lines"]
    assert _outputs(work / "node_killed") == single  # results.csv lists each input once, masks identical


def test_a_killed_driver_resumes_on_the_cluster(cluster_run):
    facts, work, single = cluster_run
    d = facts["driver_killed"]
    assert 0 < d["done_before_resume"] < 24, d
    assert d["exit_code"] == 0, d["stderr"]
    s = d["summary"]
    assert s["ok"] + s["skipped_done"] == 24 and s["skipped_done"] >= d["done_before_resume"] and s["ok"] > 0
    assert _outputs(work / "driver_killed") == single


def test_relative_input_paths_resume_on_the_cluster(cluster_run):
    """Ray workers do not share the driver's working folder: records must still hold each input's
    stat, so that --resume skips all (every journal line had "source_stat": null)."""
    facts, work, single = cluster_run
    r = facts["relative"]
    assert r["exit_codes"] == [0, 0], r["stderr"]
    assert r["stats_recorded"] and r["resumed"] == {"ok": 0, "failed": 0, "skipped_done": 24}
    masks = {k: v for k, v in single.items() if k != "results.csv"}  # its path column shows paths as typed
    assert {k: v for k, v in _outputs(work / "relative").items() if k != "results.csv"} == masks


def test_ray_without_extra_is_one_line_error(tmp_path, tiny_checkpoint, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *a, **k)

    src = _folder(tmp_path / "in", 1, broken=False)
    monkeypatch.setattr(builtins, "__import__", no_ray)
    res = runner.invoke(
        app, ["infer", str(src), "--out", str(tmp_path / "o"), "--model", str(tiny_checkpoint), "--ray", "local"]
    )
    assert res.exit_code == 2 and "lungrt[ray]" in res.output


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
    row = _read(
        {"source": str(item.source), "abs": os.path.abspath(item.source), "rel": str(item.rel), "known_error": ""},
        spec.to_json(),
    )
    row = {
        **row,
        "prob": np.full((1, spec.size, spec.size), 0.9, np.float32)[0],
        "runner": "torch/cpu/fp32",
        "model": "unet",
    }
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the worker's own folder: "in/x_000.png" does not resolve here
    assert _write(row, str(tmp_path / "out"), spec.to_json(), {})["status"] == "ok"
    monkeypatch.chdir(tmp_path)
    (record,) = read_records(tmp_path / "out").values()
    assert record["source_stat"] and record["path"] == str(item.source)  # shown as typed
    assert is_done(tmp_path / "out", item, InferOptions(), {str(item.rel): record})
    assert json.dumps(record)  # a plain journal line
