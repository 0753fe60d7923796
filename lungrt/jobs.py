"""Whole jobs that both front doors start (the CLI prints them, the Python API returns them): infer on a set of
inputs (one machine or Ray, results stored back to the PACS they came from), evaluate models on a dataset, and
export a precision variant. Above the resolver and every stage; nothing here prints."""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path

from lungrt.backends.base import Runner
from lungrt.build.resolve import open_runner
from lungrt.core.defaults import DEFAULT_MODEL
from lungrt.core.errors import LungrtError
from lungrt.inference.infer import InferOptions, gather_inputs, run_identity, run_infer


def infer_job(
    inputs: list[str],
    out_dir: str | Path,
    opts: InferOptions,
    runner: Runner | None = None,
    open_args: dict | None = None,
    ray: str | None = None,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    store: bool = False,
    store_flagged: bool = False,
    log=None,
) -> dict:
    """`lungrt infer`: gather the inputs (DICOMweb studies fetched first), segment them with `runner` (or the one
    `open_args` names, opened here) on this machine or on Ray, and with `store` send this run's SEGs of PACS
    instances back to the PACS each came from. The run's summary; what was stored where under "stored"."""
    from lungrt.inference.dicomweb import is_dicomweb_url

    if store and not any(is_dicomweb_url(str(i)) for i in inputs):
        raise LungrtError(
            "--store sends DICOM SEGs back to the PACS a DICOMweb input came from; give one (http://…/studies/UID)"
        )
    items, pacs_inputs = gather_inputs([str(i) for i in inputs], out_dir)
    if not items:
        raise LungrtError("no supported images found in the inputs")
    if ray is not None:
        from lungrt.inference.ray import require_ray

        require_ray()  # fail before any model work when the extra is missing
    args = dict(open_args or {})
    with nullcontext(runner) if runner is not None else open_runner(**args, **({"log": log} if log else {})) as r:
        if ray is None:
            summary = run_infer(r, items, out_dir, opts)
        else:
            from lungrt.inference.ray import run_infer_ray, runner_args_for

            ray_args = runner_args_for(r, args.get("source") or DEFAULT_MODEL, args.get("arch"))
            ray_run = (ray_args, r.spec, run_identity(r, opts), r.info.qc)
    if ray is not None:
        ray_args, spec, identity, qc = ray_run
        summary = run_infer_ray(
            open_runner, ray_args, spec, items, out_dir, opts, ray, actors, gpus_per_actor, identity, qc
        )
    if store:
        from lungrt.inference.dicomweb import store_results
        from lungrt.inference.journal import read_records

        summary["stored"] = store_results(Path(out_dir), pacs_inputs, read_records(Path(out_dir)), store_flagged)
        summary["pacs_inputs"] = [{"root": p.root, "study": p.study} for p in pacs_inputs]
    return summary


def evaluate_models(
    refs: list[str | None],
    data: Path,
    split: str = "test",
    seed: int = 0,
    batch_size: int = 8,
    postprocess: bool = False,
    out_dir: Path | None = None,
    onnx: Path | None = None,
    arch: str | None = None,
    convention: str | None = None,
    warn=None,
) -> list[tuple[str, dict]]:
    """(label, result) per model on one dataset split (`lungrt eval`): per-image rows and means; with `out_dir`
    each model's per-image CSV, example grid and worst-Dice grid (with the plausible shape fit). `warn(text)`
    hears when the data's mask convention is not the model's."""
    from lungrt.core.plots import prediction_grid
    from lungrt.data.datasets import select_split
    from lungrt.evaluation.evaluate import convention_warning, evaluate, write_per_image_csv

    pairs = select_split(data, split, seed)
    results = []
    for ref in [None] if onnx else refs:
        backend = "auto" if onnx else "torch"
        with open_runner(ref, onnx=onnx, arch=arch, backend=backend, convention=convention) as runner:
            if (warning := convention_warning(runner, data)) and warn is not None:
                warn(warning)
            res = evaluate(runner, pairs, batch_size=batch_size, keep=4, postprocess=postprocess)
            res["convention"] = runner.spec.convention
            label = Path(onnx).name if onnx else str(ref)
            examples, worst = res.pop("examples", None), res.pop("worst", None)
            if out_dir:
                stem = model_stem(label)
                write_per_image_csv(res["per_image"], out_dir / f"{stem}_per_image.csv")
                prediction_grid(examples, out_dir / f"{stem}_examples.png", title=f"{label} on {split}")
                title = f"{label} on {split}: lowest Dice (yellow: plausible shape fit)"
                prediction_grid(_with_shape_fits(worst, runner), out_dir / f"{stem}_worst.png", title=title)
        results.append((label, res))
    return results


def robustness_models(
    refs: list[str | None], data: Path, split: str, seed: int, out_dir: Path | None, onnx=None, arch=None
) -> list[tuple[str, dict]]:
    """(label, result) per model: Dice under synthetic abnormalities painted on the gold lung field; with
    `out_dir` a PNG of each model's worst cases (its path under "worst_png")."""
    from lungrt.data.datasets import select_split
    from lungrt.evaluation.robustness import run_robustness, worst_cases_png

    pairs = select_split(data, split, seed)
    results = []
    for ref in [None] if onnx else refs:
        with open_runner(ref, onnx=onnx, arch=arch, backend="auto" if onnx else "torch") as runner:
            res = run_robustness(runner, pairs)
        label = Path(onnx).name if onnx else str(ref)
        if out_dir:
            res["worst_png"] = str(worst_cases_png(res, out_dir / f"{model_stem(label)}_robustness_worst.png"))
        res.pop("worst")
        results.append((label, res))
    return results


def export_variant(
    model: str, out_path: Path, precision: str, calib=None, method=None, val_data=None, arch=None, log=None
):
    """`lungrt export`: the precision variant made (and gated) in the cache, copied to `out_path`."""
    from lungrt.build.variants import make_variant
    from lungrt.data.datasets import select_split
    from lungrt.models.checkpoint import resolve_model

    loaded = resolve_model(model, arch=arch)
    val = select_split(val_data, "val") if val_data else None
    v = make_variant(loaded, precision, calib_dir=calib, method=method, val_pairs=val, log=log or (lambda *a: None))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(v.path, out_path)
    return v


def model_stem(label: str) -> str:
    """A model's label as a file-name stem: a file's stem, else the name (shipped or run folder)."""
    return Path(label).stem if label.endswith((".onnx", ".xml", ".safetensors")) else Path(label).name


def _with_shape_fits(worst: list[tuple], runner) -> list[tuple]:
    """(name, image, gold, pred, fit) rows: each worst image's plausible shape fit at its size, when
    the model carries a shape model (else no fit outline)."""
    from lungrt.inference.qc import QCThresholds
    from lungrt.inference.shape import plausible_fit

    shape = QCThresholds.from_dict(runner.info.qc).shape
    return [
        (
            f"{name} (Dice {dice:.3f})",
            image,
            gold,
            pred,
            plausible_fit(prob, shape, pred.shape) if shape is not None else None,
        )
        for dice, name, image, gold, pred, prob in worst
    ]
