"""The `lungrt` command line. `lungrt.cli.app` is the Typer app; importing this package registers every command."""

from lungrt.cli import build, evaluate, infer, serve, system  # noqa: F401  (registers the commands)
from lungrt.cli._app import app, entrypoint  # noqa: F401
