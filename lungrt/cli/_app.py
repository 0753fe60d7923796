"""The `lungrt` command line (Typer + Rich): the app, its shared helpers and the global options. Each
command lives in a module of this package (infer, build, evaluate, system) as parsing and printing only."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from lungrt._version import __version__
from lungrt.core.errors import LungrtError

app = typer.Typer(
    rich_markup_mode=None,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Lung-segmentation U-Nets for chest X-rays: train, export, verify, deploy fast.",
)


data_app = typer.Typer(rich_markup_mode=None, no_args_is_help=True, help="Inspect datasets.")
app.add_typer(data_app, name="data")
out = Console(soft_wrap=True)  # piped output keeps whole lines (paths, summaries); tables still fit the terminal


def fail(message: str, code: int = 2) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run_guarded(fn):
    """Run a command body; typed lungrt errors become one line on stderr."""
    try:
        return fn()
    except LungrtError as e:
        fail(str(e))


SECOND_OPINION_HELP = (
    "QC's second opinion (lung-field models): the same architecture's whole-lung weights segment each film too, "
    "and a mask that covers too little of their lung is flagged stops_short (twice the model compute; masks "
    "unchanged)."
)
SECOND_OPINION_MODEL_HELP = (
    "With --second-opinion: the whole-lung checkpoint, ONNX file or plan to run (default: the shipped whole-lung "
    "weights; a plan for TensorRT). Refused unless QC's bound was fitted with those weights."
)


def second_opinion_arg(flag: bool, model: Optional[Path]) -> bool | str:
    """`open_runner`'s `second_opinion` from the two options."""
    if model is not None and not flag:
        fail("--second-opinion-model needs --second-opinion")
    return str(model) if model is not None else flag


def check_json_path(path: Optional[Path]) -> None:
    if path is not None and (path.is_dir() or str(path) in ("", ".")):
        fail(f"--json {path}: is a folder; give a file name such as {Path(path) / 'summary.json'}")


def write_json(path: Optional[Path], payload: dict) -> None:
    if path:
        check_json_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, default=str))
        out.print(f"wrote {path}")


@app.callback(invoke_without_command=True)
def main(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        help="Show lungrt's debug log and the INFO lines of NNCF, Polygraphy and the other libraries.",
    ),
):
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s [%(name)s] %(message)s", stream=sys.stderr)
    logging.getLogger("lungrt").setLevel(logging.DEBUG if verbose else logging.NOTSET)
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    if version:
        out.print(f"lungrt {__version__}")
        raise typer.Exit(0)


def entrypoint() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
