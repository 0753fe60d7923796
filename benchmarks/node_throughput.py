"""The DICOM node's sustained throughput against `lungrt infer` on the same films and backend, in one run, and
its per-study latency (last film received -> last result acknowledged by the destination).

    .venv/bin/python benchmarks/node_throughput.py [--studies 24 --films 4 --size 1024 --model msag-unet]

A PACS-like sender sends every study by C-STORE, one association per study, as fast as the node acknowledges;
the destination is a pynetdicom storage SCP that acknowledges every SEG (both on 127.0.0.1). Writes
benchmarks/results/node_throughput.json (no file names) and prints the ratio.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save_result  # noqa: E402


def make_films(folder: Path, studies: int, films: int, size: int) -> list[list[Path]]:
    from pydicom.uid import generate_uid

    from lungrt.data.dicom import write_dicom
    from lungrt.data.phantoms import make_chest_phantom

    out = []
    for s in range(studies):
        study, series, paths = generate_uid(), generate_uid(), []
        for f in range(films):
            path = folder / f"s{s:03d}" / f"f{f}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = (make_chest_phantom(s * 100 + f, size).image * 4000).astype(np.uint16)
            write_dicom(path, pixels, study_uid=study, series_uid=series)
            paths.append(path)
        out.append(paths)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sink(port: int) -> None:
    """A destination AE that acknowledges every SEG / Secondary Capture (its own process: a PACS's work is not
    the node's, nor is its share of the GIL)."""
    from pynetdicom import AE, evt

    ae = AE(ae_title="SINK")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.66.4")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.7")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.88.34")
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000)])


def send(studies: list[list[Path]], port: int, ready, go) -> None:
    """The PACS: each film's file as stored (no decode and re-encode: pynetdicom's chunked sending, as a PACS sends
    what it stored), one association per study."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # this process is the PACS: its switch is its own

    ae = AE(ae_title="PACS")
    ready.set()
    go.wait()  # started (and its imports done) before the clock: a PACS is running before it sends
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", ExplicitVRLittleEndian)  # the films' syntax
    for paths in studies:
        assoc = ae.associate("127.0.0.1", port, ae_title="LUNGRT")
        for p in paths:
            assoc.send_c_store(p)
        assoc.release()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=24)
    ap.add_argument("--films", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--model", default="msag-unet")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--quiet-seconds", type=float, default=1.0)
    args = ap.parse_args()
    from lungrt.build.resolve import open_runner
    from lungrt.inference.infer import InferOptions, collect_inputs, run_infer
    from lungrt.inference.node import Destination, DicomNode, NodeConfig
    from lungrt.benchmark.bench import hardware

    with (
        tempfile.TemporaryDirectory(prefix="lungrt-node-bench-") as tmp,
        open_runner(args.model, backend=args.backend, log=lambda *a: None) as runner,
    ):
        tmp = Path(tmp)
        studies = make_films(tmp / "films", args.studies, args.films, args.size)
        n = sum(len(s) for s in studies)
        opts = InferOptions(batch_size=args.batch_size, dicom_seg=True)
        run_infer(runner, collect_inputs([str(p) for p in studies[0]]), tmp / "warm-up", opts)  # untimed
        t0, c0 = time.perf_counter(), time.process_time()
        run_infer(runner, collect_inputs([str(tmp / "films")]), tmp / "infer", opts)
        infer_s, infer_cpu = time.perf_counter() - t0, time.process_time() - c0

        sink_port = free_port()
        node_port = next(p for p in iter(free_port, None) if p != sink_port)
        ctx = multiprocessing.get_context("spawn")
        server = ctx.Process(target=sink, args=(sink_port,), daemon=True)
        server.start()
        sink_ae = Destination("SINK", "127.0.0.1", sink_port)
        cfg = NodeConfig(
            tmp / "spool", port=node_port, allowed_callers=("PACS",), destinations=(sink_ae,),
            quiet_seconds=args.quiet_seconds, batch_size=args.batch_size, send_flagged=True,
        )  # fmt: skip
        node = DicomNode(runner, cfg)
        node.start()
        loop = threading.Thread(target=node.serve_forever, kwargs={"poll": 0.05})
        loop.start()
        ready, go = ctx.Event(), ctx.Event()
        sender = ctx.Process(target=send, args=(studies, node_port, ready, go))  # the PACS, in a process of its own
        sender.start()
        ready.wait(120)
        t0, c0 = time.perf_counter(), time.process_time()
        go.set()
        sender.join()
        send_s = time.perf_counter() - t0
        while len(node.latencies) < len(studies):  # (status() does the node's bookkeeping: not 20 times a second)
            time.sleep(0.05)
        node_s, node_cpu = time.perf_counter() - t0, time.process_time() - c0
        status = node.status()
        node.stop()
        loop.join()
        server.terminate()
        server.join()
        pacs_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        pacs_cpu = pacs_cpu.ru_utime + pacs_cpu.ru_stime
    result = {
        "command": "benchmarks/node_throughput.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "hardware": hardware(),
        "model": args.model,
        "backend": runner.describe(),
        "films": n,
        "studies": args.studies,
        "film_size": args.size,
        "quiet_seconds": args.quiet_seconds,
        "infer_img_per_s": n / infer_s,
        "node_img_per_s": n / node_s,
        "node_vs_infer": (n / node_s) / (n / infer_s),
        "sending_s": send_s,  # the PACS's C-STOREs of every film, while the node already segments
        "cpu_s_infer": infer_cpu,  # this process's CPU seconds (all threads): infer's run
        "cpu_s_node": node_cpu,  # and the node's (receiving, segmenting, sending; not the PACS's processes)
        "cpu_s_pacs_processes": pacs_cpu,  # the sender and the destination AE, on the same cores here
        "node_s": node_s,
        "node_seconds": status["seconds"],  # the node's own rounds: segmenting, sending results, bookkeeping
        "latency_s_p50": status["latency_s_p50"],
        "latency_s_p99": status["latency_s_p99"],
    }
    path = save_result("node_throughput", result, echo=False)
    print(
        f"node {result['node_img_per_s']:.2f} img/s vs infer {result['infer_img_per_s']:.2f} img/s: "
        f"{result['node_vs_infer']:.2f}x; per-study latency p50 {result['latency_s_p50']:.1f} s, "
        f"p99 {result['latency_s_p99']:.1f} s (quiet period {args.quiet_seconds} s included); {path}"
    )


if __name__ == "__main__":
    main()
