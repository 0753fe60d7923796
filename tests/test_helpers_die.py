"""`lungrt infer --pool process` whose main process is SIGKILLed (as the OOM killer does): its helper
processes and multiprocessing's resource tracker go with it, and nothing keeps the output's journal open."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lungrt.data.io import write_png
from lungrt.data.phantoms import make_phantom

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            if f"\nPPid:\t{pid}\n" in status:
                found.add(int(entry.name))
    return found


def _holding(path_part: str, pids: set[int]) -> set[int]:
    holders = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                if path_part in os.readlink(fd):
                    holders.add(pid)
        except OSError:
            continue
    return holders


def test_sigkill_of_infer_leaves_no_helper_behind(tmp_path, tiny_checkpoint):
    images = tmp_path / "in"
    for i in range(400):
        write_png(images / f"x{i:03d}.png", (make_phantom(i % 20, 256).image * 255).astype(np.uint8))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lungrt.cli",
            "infer",
            str(images),
            "--out",
            str(out),
            "--model",
            str(tiny_checkpoint),
            "--backend",
            "torch",
            "--pool",
            "process",
            "--workers",
            "2",
            "--batch-size",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline, helpers = time.time() + 120, set()
    while time.time() < deadline and (len(helpers) < 2 or not list(out.rglob("*.mask.png"))):
        helpers |= _children(proc.pid)
        assert proc.poll() is None, "infer ended before it could be killed"
        time.sleep(0.2)
    assert len(helpers) >= 2, helpers  # two workers (and the resource tracker)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in helpers):
        time.sleep(0.2)
    alive = {
        p for p in helpers if Path(f"/proc/{p}").exists() and "State:\tZ" not in Path(f"/proc/{p}/status").read_text()
    }
    assert not alive, f"helpers outlived their run: {alive}"
    assert not _holding(str(out), helpers)
