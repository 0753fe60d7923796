"""TensorRT engines, both flavours, laid out the Polygraphy way: `flavour` (which TensorRT, which GPUs),
`builder` (compile a plan), `metadata` (the sidecar, staleness, can it run here), `runner` (execute),
`triton` (package a plan for Triton). The public names are re-exported here."""

from lungrt.backends.tensorrt.builder import BatchProfile, EngineBuilder, PolygraphyBuilder, build_engine  # noqa: F401
from lungrt.backends.tensorrt.builder import plan_path, timing_cache_path  # noqa: F401
from lungrt.backends.tensorrt.flavour import (  # noqa: F401
    DEFAULT_RTX_TARGETS,
    FLAVOURS,
    Flavour,
    choose_flavour,
    flavour_status,
    gpu_environment,
    import_flavour,
    parse_targets,
    target_tag,
)
from lungrt.backends.tensorrt.metadata import (  # noqa: F401
    check_plan_usable,
    metadata_path,
    read_plan_metadata,
    rebuild_command,
    runtime_reasons,
    stale_reasons,
)
from lungrt.backends.tensorrt.triton import export_triton, triton_config  # noqa: F401
