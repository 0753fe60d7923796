"""`lungrt serve`: lungrt as a DICOM node (receive C-STORE, segment, send back by C-STORE); parsing and printing."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import List, Optional

import typer

from lungrt.cli._app import (
    SECOND_OPINION_HELP,
    SECOND_OPINION_MODEL_HELP,
    app,
    fail,
    out,
    run_guarded,
    second_opinion_arg,
)
from lungrt.core.defaults import DEFAULT_MODEL


@app.command()
def serve(
    spool: Path = typer.Option(..., help="The node's folder: what it receives, writes and sends (restart-safe)."),
    ae_title: str = typer.Option("LUNGRT", "--ae", help="This node's AE title (give it to the PACS)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(11112, help="DICOM port to listen on."),
    allow: List[str] = typer.Option([], "--allow", help="Calling AE title to accept (repeat); others are refused."),
    to: List[str] = typer.Option([], "--to", help="Where results go: AE@HOST:PORT (repeat for several)."),
    quiet_seconds: float = typer.Option(5.0, help="A study is complete once no film of it came for this long."),
    model: str = typer.Option(DEFAULT_MODEL, help="Checkpoint, run folder or shipped name."),
    onnx: Optional[Path] = typer.Option(None, help="Run this ONNX variant or OpenVINO IR."),
    engine: Optional[Path] = typer.Option(None, help="Run this TensorRT plan."),
    backend: str = typer.Option("auto", help="auto | torch | onnxruntime | openvino | tensorrt | tensorrt-rtx"),
    precision: Optional[str] = typer.Option(None, help="fp32 | fp16 | int8 | bf16 (default: the file's own)."),
    convention: Optional[str] = typer.Option(None, help="lung-field (default) | whole-lung."),
    second_opinion: bool = typer.Option(False, "--second-opinion", help=SECOND_OPINION_HELP),
    second_opinion_model: Optional[Path] = typer.Option(None, "--second-opinion-model", help=SECOND_OPINION_MODEL_HELP),
    batch_size: int = typer.Option(8, min=1, help="Films per model call, across studies (always this shape)."),
    workers: int = typer.Option(2, min=1, help="Decode and write helpers."),
    max_queued: int = typer.Option(2000, min=1, help="Films waiting beyond which C-STORE answers A700 (retry)."),
    min_free_mb: int = typer.Option(512, min=0, help="Free disk (MB) under which C-STORE answers A700 too."),
    secondary_capture: bool = typer.Option(False, help="Also send a Secondary Capture with the outline burned in."),
    send_flagged: bool = typer.Option(False, help="Also send QC-flagged films' results (their SEG says so)."),
    sr: bool = typer.Option(False, "--sr", help="Also a DICOM SR per film: lung areas (mm²) and QC (flagged too)."),
    status: bool = typer.Option(False, "--status", help="Print the status of the node that uses SPOOL and exit."),
):
    """Receive chest films (CR/DX) by C-STORE from the AEs you allow, segment each study once it is complete,
    and send its DICOM SEGs back by C-STORE to every --to destination, retrying until acknowledged. SIGTERM
    stops it cleanly; a restart on the same --spool loses nothing and sends nothing twice."""
    from lungrt.inference.node import Destination, DicomNode, NodeConfig, read_status

    if status:
        out.print(json.dumps(run_guarded(lambda: read_status(spool)), indent=2), highlight=False)
        return
    if not allow:
        fail("serve: name the calling AE titles to accept (--allow AE); every other association is refused")
    destinations = tuple(run_guarded(lambda: [Destination.parse(t) for t in to]))
    config = NodeConfig(
        spool, ae_title, host, port, tuple(allow), destinations, quiet_seconds, max_queued, min_free_mb,
        batch_size=batch_size, workers=workers, secondary_capture=secondary_capture, send_flagged=send_flagged,
        structured_report=sr,
    )  # fmt: skip

    def body():
        from lungrt.build.resolve import open_runner

        args = dict(onnx=onnx, engine=engine, backend=backend, precision=precision, convention=convention)
        args["second_opinion"] = second_opinion_arg(second_opinion, second_opinion_model)
        with open_runner(model, **args, log=out.print) as runner:
            node = DicomNode(runner, config)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: node.stop())
            node.start()
            sent_to = ", ".join(map(str, destinations)) or "nowhere (no --to)"
            out.print(f"listening as {ae_title} on {host}:{port}; results to {sent_to}", highlight=False)
            node.serve_forever()
            return node.status()

    final = run_guarded(body)
    out.print(f"stopped: {json.dumps(final)}", highlight=False)
