"""Shared fixtures: small synthetic data the project makes itself; the real X-rays only when present."""

from __future__ import annotations

from pathlib import Path

import pytest

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cxr-mc-sz"

needs_real_data = pytest.mark.skipif(
    not (REAL_DATA / "images").is_dir(),
    reason=f"real X-rays not present at {REAL_DATA} (restricted data, never in the repo)",
)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Derived files (ONNX variants, calibration) of the whole run go to a temp cache, not ~/.cache."""
    import os

    path = tmp_path_factory.mktemp("lungrt-cache")
    old = os.environ.get("LUNGRT_CACHE")
    os.environ["LUNGRT_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LUNGRT_CACHE", None)
    else:
        os.environ["LUNGRT_CACHE"] = old


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    from lungrt.data.phantoms import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), count=24, size=128, seed=1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, phantom_dir) -> Path:
    """A width-4 U-Net trained for a few epochs on phantoms: decisive enough for parity tests."""
    import torch

    from lungrt.training.train import TrainConfig, train

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("tiny_run")
    cfg = TrainConfig(model="unet", width=4, size=64, epochs=8, lr=5e-3, batch_size=4, seed=0, augment=False)
    train(cfg, phantom_dir, out, log=lambda *a: None)
    return with_shape_model(out / "model.safetensors", phantom_dir)


def with_shape_model(checkpoint: Path, data: Path) -> Path:
    """The checkpoint with a shape model of `data`'s masks in its QC metadata (generic bounds), as
    shipped models carry one: it must travel to ONNX files and engine sidecars."""
    from lungrt.data.datasets import discover_pairs
    from lungrt.inference.qc import GENERIC, QCThresholds, fit_shape_model
    from lungrt.models.checkpoint import load_checkpoint, save_checkpoint

    loaded = load_checkpoint(checkpoint)
    shape = fit_shape_model(discover_pairs(data).pairs, loaded.spec.size)
    loaded.info.qc = QCThresholds(dict(GENERIC), "generic bounds (tests)", shape=shape).to_dict()
    save_checkpoint(checkpoint, loaded.model, loaded.info)
    return checkpoint


def gate_forcing_a_search(loaded, pairs, target: str, folder: Path, calib_dir=None, method=None):
    """A FAKE INT8 gate midway between what whole-graph INT8 and the FP32 graph
    agree with PyTorch on `pairs`, measured on this CPU by the runner that executes the variant:
    the exclusion search must leave something in float, and it can pass (all in float is the FP32
    graph). A fixed strict gate would assert that this CPU's FP32 kernels reproduce PyTorch's masks
    exactly. Skips where INT8 is already as faithful as FP32 here."""
    from lungrt.evaluation import parity
    from lungrt.build import variants as V

    recipe = V.INT8_RECIPES[V.TARGET_RECIPES[target]]
    fp32 = V.make_variant(loaded, "fp32", folder=folder).path
    calib = V.load_calibration_set(loaded.spec, calib_dir)
    method = recipe.method or method or recipe.default_method
    probe = folder / f"probe{recipe.suffix}"
    recipe.quantize(fp32, probe, calib, method, cache_dir=folder)
    best = V._gate_summary(loaded, probe, pairs, recipe.open)["mask_agreement"]
    float_graph = V._gate_summary(loaded, fp32, pairs, recipe.open)["mask_agreement"]
    if best >= float_graph:
        pytest.skip(
            f"INT8 agrees {best:.5f}, as well as the FP32 graph ({float_graph:.5f}) on this CPU: nothing to search"
        )
    return parity.Gate((best + float_graph) / 2, None)
