"""Shared fixtures: small synthetic data the project makes itself; the real X-rays only when present."""

from __future__ import annotations

from pathlib import Path

import pytest

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cxr-mc-sz"

needs_real_data = pytest.mark.skipif(
    not (REAL_DATA / "images").is_dir(), reason=f"real X-rays not present at {REAL_DATA} (restricted data, never in the repo)"
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
    return out / "model.safetensors"
