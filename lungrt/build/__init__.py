"""`lungrt build` and the one resolver, orchestrated from the top: export (graph transforms, files) ->
compile (engines) -> verify (gates, in evaluation) -> record. `variants`: precision variants and the INT8
searches; `pipeline`: engines and CPU builds, verified; `resolve`: names and files -> runners."""

from lungrt.build.pipeline import (  # noqa: F401
    Built,
    build_and_verify,
    build_auto,
    build_cpu_auto,
    build_from_onnx,
    census_text,
    choose_backend,
    fastest_faithful,
    parity_check,
    run_build,
)
