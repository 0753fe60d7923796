"""Follow a model through `lungrt build` with a call trace: which stage the orchestrator (lungrt.build) enters, in
which order, and whether any stage ever calls back up into it.

    .venv/bin/python benchmarks/build_trace.py [--backend tensorrt-rtx|onnxruntime] [--precision fp16]

A width-4 U-Net at 64 px (built here: TensorRT-RTX compiles without a GPU). Prints the sequence of stage entries
(consecutive calls into the same stage are one entry) and the count of calls from a stage into lungrt.build;
writes benchmarks/results/build_trace.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save_result  # noqa: E402

STAGES = [  # longest prefix wins
    ("lungrt.export", "export"),
    ("lungrt.backends.tensorrt.builder", "compile"),
    ("lungrt.backends", "runners"),
    ("lungrt.evaluation", "verify"),
    ("lungrt.data", "data"),
    ("lungrt.build", "build"),
]


def stage_of(module: str) -> str | None:
    hits = [(len(p), s) for p, s in STAGES if module == p or module.startswith(p + ".")]
    return max(hits)[1] if hits else None


def trace(fn):
    """(stage entries from lungrt.build in order, calls from a stage into lungrt.build, result)."""
    entries, climbs = [], []

    def profile(frame, event, arg):
        if event != "call":
            return
        callee = stage_of(frame.f_globals.get("__name__", ""))
        caller_frame = frame.f_back
        caller = stage_of(caller_frame.f_globals.get("__name__", "")) if caller_frame else None
        if callee is None or caller is None or callee == caller:
            return
        if caller == "build":
            name = f"{callee}:{frame.f_code.co_name}"
            if not entries or entries[-1][0] != callee:
                entries.append([callee, [name]])
            elif name not in entries[-1][1]:
                entries[-1][1].append(name)
        elif callee == "build":
            climbs.append(f"{caller} -> build:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        result = fn()
    finally:
        sys.setprofile(None)
    return entries, climbs, result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="tensorrt-rtx")
    ap.add_argument("--precision", default="fp16")
    args = ap.parse_args()
    from lungrt.backends.tensorrt import BatchProfile
    from lungrt.build import build_and_verify
    from lungrt.core.spec import PreprocessSpec
    from lungrt.models import build_model
    from lungrt.models.checkpoint import LoadedModel, ModelInfo

    loaded = LoadedModel(build_model("unet", 4).eval(), ModelInfo("unet", 4, PreprocessSpec(size=64)))
    with tempfile.TemporaryDirectory(prefix="lungrt-trace-") as tmp:
        t0 = time.perf_counter()
        entries, climbs, built = trace(
            lambda: build_and_verify(
                loaded,
                args.precision,
                args.backend,
                Path(tmp),
                None,
                None,
                None,
                BatchProfile(1, 2, 4),
                1.0,
                True,
                log=lambda *a: None,
            )  # fmt: skip
        )
        seconds = time.perf_counter() - t0
    sequence = [stage for stage, _ in entries]
    result = {
        "command": "benchmarks/build_trace.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "backend": args.backend,
        "precision": args.precision,
        "stage_sequence": sequence,
        "entries": [{"stage": s, "calls": names} for s, names in entries],
        "calls_back_into_build": climbs,
        "passed": bool(built.verification.get("passed", True)) if hasattr(built, "verification") else None,
        "seconds": round(seconds, 1),
    }
    save_result("build_trace", result, echo=False)
    print(" -> ".join(sequence))
    for s, names in entries:
        print(f"  {s}: {', '.join(names)}")
    print(f"calls from a stage back into lungrt.build: {len(climbs)}")


if __name__ == "__main__":
    main()
