"""Third-party chatter routed through Python logging, for the span of a call.

NNCF logs INFO lines and draws progress bars on stdout through a handler and console of its own,
Polygraphy prints `[I]`/`[W]` lines itself, Ray warns through a console handler of its own. Inside
`third_party_logs()` both go through `logging` instead ("nncf", "Polygraphy"),
at WARNING unless lungrt's own logger is at DEBUG (`lungrt --verbose`). Everything is restored on
exit: importing lungrt, or calling it, leaves the libraries as it found them.
"""

from __future__ import annotations

import contextlib
import logging
import sys


def verbose() -> bool:
    return logging.getLogger("lungrt").isEnabledFor(logging.DEBUG)


@contextlib.contextmanager
def _nncf_through_logging(level: int):
    if "nncf" not in sys.modules:  # nothing to tame until it is imported; import it the same way
        yield
        return
    from nncf.common.logging import track_progress

    nncf_logger = logging.getLogger("nncf")
    saved = (list(nncf_logger.handlers), nncf_logger.propagate, nncf_logger.level)
    for h in saved[0]:
        nncf_logger.removeHandler(h)
    nncf_logger.propagate, nncf_logger.level = True, level
    # its progress bars (statistics collection, bias correction) draw on stdout: lungrt shows its own
    track_init = track_progress.track.__init__

    def quiet_track(self, *args, **kwargs):
        track_init(self, *args, **{**kwargs, "disable": level > logging.DEBUG or kwargs.get("disable", False)})

    track_progress.track.__init__ = quiet_track
    try:
        yield
    finally:
        track_progress.track.__init__ = track_init
        for h in saved[0]:
            nncf_logger.addHandler(h)
        nncf_logger.propagate, nncf_logger.level = saved[1], saved[2]


@contextlib.contextmanager
def _polygraphy_through_logging(level: int):
    if "polygraphy" not in sys.modules:
        yield
        return
    from polygraphy.logger import G_LOGGER

    saved = G_LOGGER.use_python_logging_system
    G_LOGGER.use_python_logging_system = True
    severity = G_LOGGER.VERBOSE if level <= logging.DEBUG else G_LOGGER.WARNING
    try:
        with G_LOGGER.verbosity(severity):
            yield
    finally:
        G_LOGGER.use_python_logging_system = saved


# Ray's console chatter for a run lungrt drives: Ray Data's notes that its own progress bars are off
# (lungrt draws one) and on scheduling; the token-authentication notice of a cluster lungrt starts
RAY_CHATTER = ("ray.data", "ray._private.authentication")


@contextlib.contextmanager
def _ray_quiet(level: int):
    """Ray's loggers above raised to ERROR (DEBUG when verbose) for the span."""
    if "ray" not in sys.modules:
        yield
        return
    loggers = [logging.getLogger(name) for name in RAY_CHATTER]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG if level <= logging.DEBUG else logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, saved):
            lg.setLevel(lv)


class _LinesToLog:
    """A write-only text stream that logs each complete line (for libraries that print)."""

    def __init__(self, logger: logging.Logger, level: int):
        self.logger, self.level, self.pending = logger, level, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.strip():
                self.logger.log(self.level, line)
        return len(text)

    def flush(self) -> None:
        pass


@contextlib.contextmanager
def third_party_logs(*modules: str, prints: str | None = None):
    """Import `modules` (e.g. "nncf", "polygraphy"), then route their logs through `logging` at
    WARNING (DEBUG when lungrt is verbose) until the block ends. `prints`: a logger name for what
    the block prints to stdout (ONNX Runtime's calibration prints its progress), logged at DEBUG."""
    import importlib

    for m in modules:
        importlib.import_module(m)
    level = logging.DEBUG if verbose() else logging.WARNING
    printed = (
        contextlib.redirect_stdout(_LinesToLog(logging.getLogger(prints), logging.DEBUG))
        if prints
        else contextlib.nullcontext()
    )
    with _nncf_through_logging(level), _polygraphy_through_logging(level), _ray_quiet(level), printed:
        yield
