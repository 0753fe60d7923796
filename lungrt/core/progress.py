"""One Rich progress-bar style for every long task; quiet when not on a terminal (CI logs)."""

from __future__ import annotations

import contextlib
import logging

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def progress_bar(transient: bool = False) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=not console.is_terminal,
    )


@contextlib.contextmanager
def working_on(what: str):
    """One line with a spinner and the elapsed time while a step of unknown length runs (an ONNX
    export on first use, a compile), gone when it ends; logged too, for logs and notebooks."""
    logging.getLogger("lungrt").info(what)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as bar:
        bar.add_task(what, total=None)
        yield
