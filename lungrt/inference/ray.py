"""`lungrt infer --ray`: the same inference as `infer.py`, scheduled by Ray Data.

Listing happens on the driver; reading and preprocessing run as CPU tasks; inference runs in an
actor pool (ActorPoolStrategy) where each actor opens the runner once; writing runs as CPU tasks
through the very function the single-machine path uses (`finish_one`), with the same atomic writes,
records and resume rule. Backpressure comes from Ray's streaming executor. Outputs must live on a
filesystem every node can reach.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from types import SimpleNamespace
from pathlib import Path

import numpy as np

from lungrt.core.errors import LungrtError
from lungrt.inference.inputs import Item, prepare_out_dir
from lungrt.inference.measure import finish_or_error_row
from lungrt.inference.options import InferOptions
from lungrt.inference.outputs import (
    error_row,
    remove_partial_writes,
    skipped_row,
    todo_items,
    write_record,
    write_results_csv,
)
from lungrt.inference.stream import batch_shape, load, run_batch
from lungrt.inference.journal import lock_out_dir, write_summary
from lungrt.data.io import XRay
from lungrt.core.spec import PreprocessSpec
from lungrt.core.logs import third_party_logs
from lungrt.core.progress import progress_bar


def require_ray():
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise LungrtError("--ray needs Ray Data: pip install 'lungrt[ray]'") from None
    return ray


def connect(address: str) -> None:
    """'local' starts a cluster on this machine; 'auto' joins the one running here; else an address."""
    ray = require_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # lungrt draws its own bar
    ctx.print_on_execution_start = False
    if ray.is_initialized():
        return
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    with third_party_logs("ray"):
        if address == "local":
            _start_loopback_cluster(ray, kwargs)
        else:
            ray.init(address=address, **kwargs)


def _start_loopback_cluster(ray, kwargs: dict) -> None:
    """A one-machine cluster that listens and advertises on 127.0.0.1 only.

    `ray.init(_node_ip_address="127.0.0.1")` is not enough: Ray swaps a loopback address for the
    machine's external one (`services.resolve_ip_for_localhost`) and then listens on it too. Ray's
    own switch for single-machine platforms (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, read into
    `ray_constants.ENABLE_RAY_CLUSTER`) makes it pick 127.0.0.1, and with that node address its
    servers bind to loopback. The switch is flipped only around `ray.init`; every node's address
    is then checked, so a Ray that ignores it is refused rather than exposed."""
    from ray._private import ray_constants

    was = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", num_cpus=os.cpu_count(), **kwargs)  # new, never a stale one in /tmp/ray
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = was
    exposed = sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["NodeManagerAddress"] != "127.0.0.1"})
    if exposed:
        ray.shutdown()
        raise LungrtError(
            f"--ray local: Ray advertised {', '.join(exposed)} instead of 127.0.0.1; refusing to run a "
            "cluster reachable from other machines (start one yourself and pass its address)"
        )


def _read(row: dict, spec_json: str, screen: str = "flag") -> dict:
    """The stream's own loader (same errors, same preprocessing, same screening); workers read by absolute path."""
    spec = PreprocessSpec.from_json(spec_json)
    frame = load(Item(Path(row["abs"]), Path(row["rel"]), row["known_error"]), spec, screen=screen)
    xr, tensor = frame.xray, frame.tensor
    if frame.status != "ok":
        s = spec.size
        return {
            **row,
            "error": frame.error,
            "skipped": ";".join(frame.skipped),
            "note": frame.note,
            "tensor": np.zeros((1, s, s), np.float32),
            "image": np.zeros((1, 1), np.uint8),
            "spacing": np.zeros(2, np.float64),
            "bits": 0,
            "header": "{}",
            "shape": np.array(xr.shape if xr is not None else (0, 0), np.int64),
        }
    return {
        **row,
        "error": "",
        "skipped": "",
        "note": "",
        "tensor": tensor,
        "image": xr.gray8,  # one dtype for every row; all the writer needs
        "spacing": np.array(xr.spacing_mm or (0.0, 0.0), np.float64),
        "bits": xr.bits,
        "header": json.dumps(xr.header or {}),
        "shape": np.array(xr.shape, np.int64),
    }


class _NoProfile:
    """The driver holds no runner here: the batch is bounded by the inputs; an engine's profile bounds it in
    the actor (`open_runner` refuses a batch outside it)."""


class InferActor:
    """Opens the runner once per actor; pads partial batches like the single-machine path."""

    def __init__(self, runner_args: dict, batch_size: int, opener):
        self.runner = opener(**runner_args, log=lambda *a: None)  # the driver's resolver, passed down
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        x = np.asarray(batch["tensor"], np.float32)
        n = len(x)
        batch["prob"], refs = run_batch(self.runner, list(x), self.batch_size)
        if refs is not None:  # the second opinion's probabilities, for QC's whole_lung_cover
            batch["reference"] = refs
        batch["runner"] = np.array([self.runner.describe()] * n)
        batch["model"] = np.array([self.runner.info.name] * n)
        del batch["tensor"]
        return batch


class _RunnerView:
    """What `finish_one` needs of a runner, rebuilt in a writer task."""

    def __init__(
        self, spec: PreprocessSpec, described: str, model: str, qc: dict | None = None, artifact: str | None = None
    ):
        from lungrt.core.modelinfo import ModelInfo

        self.spec, self._described, self.info = spec, described, ModelInfo(model, 0, spec, qc=qc or {})
        self.content_hash = artifact  # what ran, for a DICOM SEG's algorithm identification

    def describe(self) -> str:
        return self._described


def _write(
    row: dict, out_dir: str, spec_json: str, opts: dict, qc_json: str = "{}", artifact: str | None = None
) -> dict:
    item = Item(Path(row["source"]), Path(row["rel"]), where=Path(row["abs"]))  # shown as typed, read by absolute path
    spec = PreprocessSpec.from_json(spec_json)
    view = _RunnerView(spec, str(row["runner"]), str(row["model"]), json.loads(qc_json), artifact)
    options = InferOptions(**opts)
    if row["skipped"]:  # a SEG, SR, multi-frame, or screened out by its header: skipped, as on one machine
        shape = SimpleNamespace(shape=tuple(int(v) for v in row["shape"])) if int(row["shape"][0]) else None
        skipped = skipped_row(item, shape, str(row["skipped"]).split(";"), view, str(row["note"]))
        rec = write_record(Path(out_dir), item, skipped)
    elif row["error"]:
        rec = write_record(Path(out_dir), item, error_row(item, str(row["error"]), view))
    else:
        sp = tuple(float(v) for v in row["spacing"])
        xr = XRay(
            str(item.source),
            np.asarray(row["image"]),
            sp if sp[0] > 0 else None,
            int(row["bits"]),
            header=json.loads(str(row["header"])) or None,
        )
        prob = np.asarray(row["prob"], np.float32)
        reference = np.asarray(row["reference"], np.float32) if "reference" in row else None
        rec = finish_or_error_row(Path(out_dir), item, xr, prob, view, options, reference=reference)
    return {"status": rec["status"], "qc": str(rec.get("qc") or ""), "not_image": "not_a_radiograph" in row["skipped"]}


def runner_args_for(runner, model: str, arch: str | None) -> dict:
    """How an actor re-opens, on any node, exactly the runner the driver resolved (artefacts by
    absolute path: they must be on storage every node sees; the resolver checks their content)."""
    asked = {"backend": runner.backend, "precision": runner.precision, "device": runner.device}
    reference = getattr(runner, "reference", None)
    if reference is not None:  # the second opinion's artefact, or the shipped whole-lung weights it was fitted with
        asked["second_opinion"] = str(Path(reference.path).resolve()) if reference.path is not None else True
    if runner.path is not None:
        return {"source": str(Path(runner.path).resolve()), **asked}
    ref = str(Path(model).resolve()) if Path(model).exists() else model
    return {"source": ref, "arch": arch, **asked}


def run_infer_ray(
    opener,
    runner_args: dict,
    spec: PreprocessSpec,
    items: list[Item],
    out_dir: str | Path,
    opts: InferOptions,
    address: str = "local",
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    identity: dict | None = None,
    qc: dict | None = None,
) -> dict:
    ray = require_ray()
    from ray.data import ActorPoolStrategy

    if opts.strict:
        raise LungrtError("--strict is not supported with --ray (inputs are processed out of order)")
    out_dir = prepare_out_dir(Path(out_dir)).resolve()
    with lock_out_dir(out_dir):
        return _run_locked(
            ray,
            ActorPoolStrategy,
            opener,
            runner_args,
            spec,
            items,
            out_dir,
            opts,
            address,
            actors,
            gpus_per_actor,
            identity,
            qc,
        )


def _run_locked(
    ray,
    ActorPoolStrategy,
    opener,
    runner_args,
    spec,
    items,
    out_dir,
    opts,
    address,
    actors,
    gpus_per_actor,
    identity,
    qc,
):
    remove_partial_writes(out_dir)
    todo = todo_items(out_dir, items, opts, identity)
    opts = replace(opts, batch_size=batch_shape(opts.batch_size, len(items), _NoProfile()))
    connect(address)
    t0 = time.perf_counter()
    ok = failed = flagged = screened = not_images = 0
    if todo:
        spec_json = spec.to_json()
        opts_d = {k: getattr(opts, k) for k in InferOptions.__dataclass_fields__}
        ds = ray.data.from_items(
            [
                {
                    "source": str(it.source),
                    "abs": os.path.abspath(it.source),
                    "rel": str(it.rel),
                    "known_error": it.error,
                }
                for it in todo
            ]
        )
        ds = ds.map(_read, fn_kwargs={"spec_json": spec_json, "screen": opts.screen})
        ds = ds.map_batches(
            InferActor,
            fn_constructor_kwargs={"runner_args": runner_args, "batch_size": opts.batch_size, "opener": opener},
            batch_size=opts.batch_size,
            compute=ActorPoolStrategy(size=actors),
            num_gpus=gpus_per_actor or None,
            batch_format="numpy",
        )
        ds = ds.map(
            _write,
            fn_kwargs={
                "out_dir": str(out_dir),
                "spec_json": spec_json,
                "opts": opts_d,
                "qc_json": json.dumps(qc or {}),
                "artifact": (identity or {}).get("artifact"),
            },
        )
        with third_party_logs("ray"), progress_bar() as bar:
            task = bar.add_task(f"infer on Ray ({actors} actor{'s' if actors > 1 else ''})", total=len(todo))
            for row in ds.iter_rows():
                ok += row["status"] == "ok"
                failed += row["status"] == "error"
                screened += row["status"] == "skipped" and not row["not_image"]
                not_images += bool(row["not_image"])
                flagged += row["status"] == "ok" and row["qc"] not in ("", "ok")
                bar.advance(task)
    elapsed = time.perf_counter() - t0
    csv_path = write_results_csv(out_dir, items)
    summary = {
        "inputs": len(items),
        "skipped_done": len(items) - len(todo),
        "ok": ok,
        "failed": failed,
        "qc_flagged": flagged,
        "screened_out": screened,
        "not_radiographs": not_images,
        "stopped_early": False,
        "seconds": elapsed,
        "images_per_second": (ok + failed) / elapsed if elapsed else 0.0,
        "results_csv": str(csv_path),
        "backend": f"ray[{address}]",
        "model": (identity or {}).get("model") or str(runner_args.get("source") or ""),
        "artifact": (identity or {}).get("artifact"),
        "runner_args": json.dumps(runner_args, default=str),
    }
    return write_summary(out_dir, summary)
