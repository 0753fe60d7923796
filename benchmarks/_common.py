"""What the benchmark scripts share: where their results go."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).with_name("results")


def provenance() -> dict:
    """What every result names (docs/results pages show it): the command, date, lungrt version and the CPU
    as lscpu reports it, never a constant."""
    import sys
    import time

    from lungrt._version import __version__
    from lungrt.core.hardware import cpu_identity

    ident = cpu_identity()
    return {
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "lungrt_version": __version__,
        "cpu": ident["cpu"],
        "cpu_flags": ident["cpu_flags"],
    }


def save_result(name: str, result: dict, echo: bool = True) -> Path:
    """results/NAME.json (indented, with its provenance where the result does not say), printed too unless
    `echo` is False."""
    if isinstance(result, dict):
        result = {**{k: v for k, v in provenance().items() if k not in result}, **result}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    if echo:
        print(json.dumps(result, indent=1))
    return path
