"""Ray scenarios that `tests/test_ray.py` runs inside a private network namespace (not a test file).

    python tests/ray_scenarios.py local   CHECKPOINT SRC WORK
    python tests/ray_scenarios.py cluster CHECKPOINT SRC WORK

`local`: `lungrt infer --ray local` into WORK/local, then what the cluster it started listens on
and advertises. `cluster`: a real cluster of a head and two worker nodes (`ray.cluster_utils.Cluster`:
separate raylets, object stores and worker processes on this machine), then `lungrt infer --ray
ADDRESS` four ways: undisturbed (WORK/cluster), one worker node killed mid-run (WORK/node_killed),
the driver killed mid-run and `--resume` (WORK/driver_killed), relative input paths run from WORK
and resumed (WORK/relative). Each writes WORK/<scenario>.json with the facts the test asserts; the
outputs are compared byte for byte with a single-machine run by the test itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from typer.testing import CliRunner

from lungrt.cli import app
from lungrt.inference.journal import RECORDS, read_records

BATCH = ["--backend", "torch", "--batch-size", "2"]


def listening_addresses() -> list[str]:
    """Local addresses of every listening TCP socket in this network namespace (`ss`)."""
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split()[3] for line in out.splitlines())


def node_addresses() -> list[str]:
    import ray

    return sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])


def journal_lines(out: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in (out / RECORDS).glob("*.jsonl"))


def cli(args: list[str]) -> dict:
    res = CliRunner().invoke(app, ["infer", *args])
    return {"exit_code": res.exit_code, "output": res.output[-3000:]}


def wait_for_records(out: Path, n: int, alive=lambda: True, timeout: float = 240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline and alive() and len(read_records(out)) < n:
        time.sleep(0.05)
    return len(read_records(out))


def settle(out: Path) -> int:
    """Records once no straggler (a worker that outlived its driver) adds one more."""
    done, now = -1, len(read_records(out))
    while done != now:
        done = now
        time.sleep(1.0)
        now = len(read_records(out))
    return done


def scenario_local(ckpt: str, src: Path, work: Path) -> dict:
    import ray

    fact = cli([str(src), "--out", str(work / "local"), "--model", ckpt, *BATCH, "--overlay", "--ray", "local"])
    return {**fact, "nodes": node_addresses() if ray.is_initialized() else [], "listening": listening_addresses()}


def driver_cmd(ckpt: str, src: str, out: Path, address: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lungrt.cli",
        "infer",
        src,
        "--out",
        str(out),
        "--model",
        ckpt,
        *BATCH,
        "--ray",
        address,
        "--json",
        str(out) + ".summary.json",
    ]


def scenario_cluster(ckpt: str, src: Path, work: Path) -> dict:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    facts: dict = {"address": cluster.address}
    try:
        facts["undisturbed"] = cli(
            [str(src), "--out", str(work / "cluster"), "--model", ckpt, *BATCH, "--ray", cluster.address]
        )
        facts["nodes"], facts["listening"] = node_addresses(), listening_addresses()
        facts["node_killed"] = _kill_a_worker_node(cluster, workers[0], ckpt, src, work / "node_killed")
        facts["driver_killed"] = _kill_the_driver(cluster.address, ckpt, src, work / "driver_killed")
        facts["relative"] = _relative_paths(cluster.address, ckpt, src, work)
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
    return facts


def _kill_a_worker_node(cluster, node, ckpt: str, src: Path, out: Path) -> dict:
    """A worker node dies (SIGKILL of its raylet and workers) once a few inputs are done."""
    killed, finished = {}, threading.Event()

    def kill_when_started():
        killed["records_before"] = wait_for_records(out, 4, alive=lambda: not finished.is_set())
        if not finished.is_set():
            cluster.remove_node(node, allow_graceful=False)
            killed["killed"] = True

    killer = threading.Thread(target=kill_when_started)
    killer.start()
    fact = cli([str(src), "--out", str(out), "--model", ckpt, *BATCH, "--ray", cluster.address])
    finished.set()
    killer.join()
    deadline = time.time() + 60  # Ray marks a node dead after missed health checks, perhaps after the run ended
    while killed.get("killed") and len(node_addresses()) > 2 and time.time() < deadline:
        time.sleep(0.5)
    return {**fact, **killed, "journal_lines": journal_lines(out), "nodes_after": node_addresses()}


def _kill_the_driver(address: str, ckpt: str, src: Path, out: Path) -> dict:
    """A driver process SIGKILLed mid-run; `--resume` (from this process, another driver) finishes."""
    proc = subprocess.Popen(
        driver_cmd(ckpt, str(src), out, address), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_records(out, 4, alive=lambda: proc.poll() is None)
    os.kill(proc.pid, signal.SIGKILL)  # the driver only: the cluster and its workers stay up
    proc.wait()
    done = settle(out)
    res = cli(driver_cmd(ckpt, str(src), out, address)[4:] + ["--resume"])
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    return {
        "done_before_resume": done,
        "exit_code": res["exit_code"],
        "stderr": res["output"],
        "summary": {k: summary[k] for k in ("ok", "failed", "skipped_done")},
    }


def _relative_paths(address: str, ckpt: str, src: Path, work: Path) -> dict:
    """Inputs and --out given relative to the driver's folder (not the Ray workers'), then --resume."""
    here = os.getcwd()
    os.chdir(work)
    try:
        args = driver_cmd(ckpt, os.path.relpath(src, work), Path("relative"), address)[4:]
        first, again = cli(args), cli(args + ["--resume"])
    finally:
        os.chdir(here)
    summary = json.loads((work / "relative.summary.json").read_text())
    return {
        "exit_codes": [first["exit_code"], again["exit_code"]],
        "stderr": first["output"] + again["output"],
        "resumed": {k: summary[k] for k in ("ok", "failed", "skipped_done")},
        "stats_recorded": all(r.get("source_stat") for r in read_records(work / "relative").values()),
    }


if __name__ == "__main__":
    name, ckpt, src, work = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
    facts = {"local": scenario_local, "cluster": scenario_cluster}[name](ckpt, src, work)
    (work / f"{name}.json").write_text(json.dumps(facts, indent=1))
