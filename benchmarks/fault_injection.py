"""Fault injection for `lungrt infer`: kill and resume, two concurrent runs, same-name inputs, a
tiny full disk, named pipes among the inputs, and on a 3-node Ray cluster (loopback only) a worker
node killed, the driver killed, relative paths resumed; each checked against an uninterrupted run. Prints what it
tried and whether anything was lost.

    .venv/bin/python benchmarks/fault_injection.py [--images 60] [--model unet]

The full-disk case mounts a small tmpfs and the Ray cases run in a private network namespace (both
need root with CAP_SYS_ADMIN); elsewhere they are skipped or reported with the reason. Everything runs in a
temporary folder that is removed afterwards.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lungrt.data.io import write_png
from lungrt.data.phantoms import make_phantom


def lungrt(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lungrt.cli", *args], capture_output=True, text=True, **kw)


def snapshot(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and ".lungrt-records" not in p.parts and p.name != ".lungrt-lock"
    }


def rows(out: Path) -> list[dict]:
    with open(out / "results.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def same_as(ref: dict, out: Path) -> bool:
    return snapshot(out) == ref


def fifo_among_inputs(tmp: Path, src: Path, ref: dict, common: list[str]) -> tuple[str, str, str, bool]:
    """Named pipes beside the images (one with an image's extension, one without): a row each, never a hang."""
    import os

    folder = tmp / "fifo" / "in"
    folder.mkdir(parents=True)
    for f in src.iterdir():
        os.link(f, folder / f.name)
    os.mkfifo(folder / "pipe.png")
    os.mkfifo(folder / "pipe")
    out = tmp / "fifo" / "out"
    t0 = time.perf_counter()
    try:
        r = lungrt("infer", str(folder), "--out", str(out), *common, timeout=300)
    except subprocess.TimeoutExpired:
        return (
            "FIFO among inputs",
            "mkfifo in/pipe.png and in/pipe beside the images",
            "hung (killed after 300 s)",
            False,
        )
    got = {row["path"].rsplit("/", 1)[-1]: row for row in rows(out)}
    masks = {k: v for k, v in ref.items() if k.endswith(".png")}  # both input folders are named "in"
    same = {k: v for k, v in snapshot(out).items() if k.endswith(".png")} == masks
    pipe = got.get("pipe.png", {})
    ok = r.returncode == 3 and "not a regular file" in pipe.get("error", "") and same
    return (
        "FIFO among inputs",
        "mkfifo in/pipe.png and in/pipe beside the images",
        f"exit {r.returncode} in {time.perf_counter() - t0:.0f} s; pipe.png row: '{pipe.get('error', 'none')[:40]}'; "
        f"masks and overlays identical to reference: {same}",
        ok,
    )


def ray_cluster_faults(tmp: Path, src: Path, model: str) -> list[tuple[str, str, str, bool]]:
    """tests/ray_scenarios.py's cluster (a head and two worker nodes) in a loopback-only network
    namespace: a worker node killed mid-run, the driver killed and resumed, relative paths resumed."""
    import json
    import os

    work = tmp / "ray"
    work.mkdir()
    ref_dir = work / "reference"
    r = lungrt(
        "infer",
        str(src),
        "--out",
        str(ref_dir),
        "--model",
        model,
        "--backend",
        "torch",
        "--batch-size",
        "2",
        timeout=1800,
    )
    assert r.returncode == 0, r.stderr
    ref = snapshot(ref_dir)
    scenarios = Path(__file__).parents[1] / "tests" / "ray_scenarios.py"
    sealed = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    run = subprocess.run(
        [*sealed, sys.executable, str(scenarios), "cluster", model, str(src), str(work)],
        capture_output=True,
        text=True,
        timeout=3600,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    if run.returncode != 0:
        why = (run.stderr.strip().splitlines() or ["failed"])[-1][:100]
        return [("Ray cluster", "3 nodes in a loopback-only network namespace", f"could not run: {why}", False)]
    facts = json.loads((work / "cluster.json").read_text())
    k, d, rel = facts["node_killed"], facts["driver_killed"], facts["relative"]
    n = len(rows(ref_dir))
    masks = {key: v for key, v in ref.items() if key != "results.csv"}
    same_rel = {key: v for key, v in snapshot(work / "relative").items() if key != "results.csv"} == masks
    return [
        (
            "Ray worker node killed",
            f"3-node cluster on 127.0.0.1 only; a worker node SIGKILLed after {k['records_before']} inputs",
            f"exit {k['exit_code']}, {k['journal_lines']} journal lines for {n} inputs, byte-identical to a "
            f"single-machine run: {snapshot(work / 'node_killed') == ref}",
            k["exit_code"] == 0 and snapshot(work / "node_killed") == ref,
        ),
        (
            "Ray driver killed",
            f"driver SIGKILLed after {d['done_before_resume']} inputs, then --resume --ray",
            f"exit {d['exit_code']}, {d['summary']['ok']} redone + {d['summary']['skipped_done']} skipped, "
            "byte-identical: "
            f"{snapshot(work / 'driver_killed') == ref}",
            d["exit_code"] == 0 and snapshot(work / "driver_killed") == ref,
        ),
        (
            "Ray relative paths",
            "inputs given relative to the driver's folder, then --resume",
            f"resume: {rel['resumed']['skipped_done']} of {n} skipped, {rel['resumed']['ok']} redone; masks identical: "
            f"{same_rel}",
            rel["exit_codes"] == [0, 0] and rel["resumed"]["skipped_done"] == n and same_rel,
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--model", default="unet")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lungrt-faults-"))
    results: list[tuple[str, str, str, bool]] = []
    try:
        src = tmp / "in"
        for i in range(args.images):
            write_png(src / f"img_{i:03d}.png", (make_phantom(300 + i, 256).image * 255).astype(np.uint8))
        common = ["--model", args.model, "--backend", "onnxruntime", "--batch-size", "4", "--overlay"]
        ref_dir = tmp / "reference"
        r = lungrt("infer", str(src), "--out", str(ref_dir), *common, timeout=900)
        assert r.returncode == 0, r.stderr
        ref = snapshot(ref_dir)

        # 1. SIGKILL / SIGTERM / SIGINT at several points, then --resume
        for sig, after in ((signal.SIGKILL, 5), (signal.SIGKILL, 30), (signal.SIGTERM, 15), (signal.SIGINT, 45)):
            out = tmp / f"kill-{sig.name}-{after}"
            p = subprocess.Popen(
                [sys.executable, "-m", "lungrt.cli", "infer", str(src), "--out", str(out), *common],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.time() + 300
            while time.time() < deadline and len(list(out.rglob("*.mask.png"))) < after and p.poll() is None:
                time.sleep(0.02)
            p.send_signal(sig)
            p.wait()
            done = len(list(out.rglob("*.mask.png")))
            r = lungrt("infer", str(src), "--out", str(out), *common, "--resume", timeout=900)
            ok = r.returncode == 0 and same_as(ref, out)
            results.append(
                (
                    "kill + resume",
                    f"{sig.name} after ~{after} masks ({done} on disk), then --resume",
                    f"exit {r.returncode}, {len(rows(out))} rows, byte-identical to reference: {ok}",
                    ok,
                )
            )

        # 2. two runs on one --out at once
        out = tmp / "concurrent"
        first = subprocess.Popen(
            [sys.executable, "-m", "lungrt.cli", "infer", str(src), "--out", str(out), *common],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        while not (out / ".lungrt-lock").exists() and first.poll() is None:
            time.sleep(0.02)
        time.sleep(0.5)
        second = lungrt("infer", str(src / "img_000.png"), "--out", str(out), *common, timeout=300)
        first.wait()
        ok = second.returncode == 2 and "in use" in second.stderr and first.returncode == 0 and same_as(ref, out)
        results.append(
            (
                "concurrent runs",
                "second `infer` on the same --out while the first runs",
                f"second: exit {second.returncode} ({' '.join(second.stderr.split())[:70]}...); first: "
                f"{len(rows(out))} rows, identical to reference: {same_as(ref, out)}",
                ok,
            )
        )

        # 3. same file names in different folders
        same = [tmp / d / "x.png" for d in ("siteA", "siteB", "siteC")]
        for i, f in enumerate(same):
            f.parent.mkdir(parents=True)
            shutil.copyfile(src / f"img_{i:03d}.png", f)
        out = tmp / "same-names"
        r = lungrt("infer", *map(str, same), "--out", str(out), *common, timeout=300)
        got = rows(out)
        masks = {row["mask"] for row in got}
        ok = (
            r.returncode == 0
            and sorted(row["path"] for row in got) == sorted(map(str, same))
            and len(masks) == 3
            and all((out / m).read_bytes() == ref[f"in/img_{i:03d}.mask.png"] for i, m in enumerate(sorted(masks)))
        )
        results.append(
            (
                "same-name inputs",
                "siteA/x.png siteB/x.png siteC/x.png",
                f"{len(got)} rows, {len(masks)} distinct masks, each equal to its image's reference: {ok}",
                ok,
            )
        )

        # 4. a tiny full disk, then more space and --resume
        disk = tmp / "disk"
        disk.mkdir()
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(disk)], capture_output=True, text=True
        )
        if mounted.returncode != 0:
            results.append(
                (
                    "full disk",
                    "1 MiB tmpfs as --out",
                    f"SKIPPED: cannot mount a tmpfs here "
                    f"({(mounted.stderr.strip() or 'mount failed').splitlines()[0][:80]})",
                    True,
                )
            )
        else:
            try:
                out = disk / "out"
                r = lungrt("infer", str(src), "--out", str(out), *common, timeout=900)
                first_line = " ".join(r.stderr.split())
                partial = len(list(out.rglob("*.mask.png")))
                subprocess.run(["mount", "-o", "remount,size=256M", str(disk)], check=True)
                r2 = lungrt("infer", str(src), "--out", str(out), *common, "--resume", timeout=900)
                ok = r.returncode == 2 and "Traceback" not in r.stderr and r2.returncode == 0 and same_as(ref, out)
                results.append(
                    (
                        "full disk",
                        "1 MiB tmpfs as --out; then 256 MiB and --resume",
                        f"first: exit {r.returncode} after {partial} masks ('{first_line[:60]}...'); "
                        f"resume: exit {r2.returncode}, identical to reference: {same_as(ref, out)}",
                        ok,
                    )
                )
            finally:
                subprocess.run(["umount", str(disk)], capture_output=True)

        results.append(fifo_among_inputs(tmp, src, ref, common))
        results.extend(ray_cluster_faults(tmp, src, args.model))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.images} phantom X-rays, model {args.model} on onnxruntime, batch 4, with overlays\n")
    print("| fault | what was tried | what happened | nothing lost |")
    print("|---|---|---|---|")
    for fault, tried, happened, ok in results:
        print(f"| {fault} | {tried} | {happened} | {'yes' if ok else 'NO'} |")
    sys.exit(0 if all(ok for *_, ok in results) else 1)


if __name__ == "__main__":
    main()
