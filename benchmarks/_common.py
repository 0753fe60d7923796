"""What the benchmark scripts share: where their results go."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).with_name("results")


def save_result(name: str, result: dict, echo: bool = True) -> Path:
    """results/NAME.json (indented), printed too unless `echo` is False."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    if echo:
        print(json.dumps(result, indent=1))
    return path
